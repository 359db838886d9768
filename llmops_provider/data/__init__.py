"""The data pipeline: document steps, MinHash dedup, language id, tokenization and the data card.

``prepare_corpus`` is the Spark application the data operator submits (from wherever the
provider is installed); the other modules are what its driver and executors call, and are
plain Python with numpy (tested without Spark). Nothing here is imported at DAG parse time.
"""

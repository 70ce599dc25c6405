"""Small dataset fixtures for the data-pipeline tests.

- tests/fixtures/data/fastchat_sample.parquet: the rows of fastchat_sample.json (ShareGPT) as
  Parquet (snappy, list<struct<from, value>>), to check Parquet and JSON give the same tokens.
- tests/fixtures/data/gsm8k_sample.jsonl: the first 16 rows of GSM8K train
  (../shared/data/datasets/gsm8k, MIT), for field remapping (question/answer).

Reference versions: pyarrow 26.0.1.   Run: $KILN_REFPY scripts/golden/make_data_fixtures.py
"""
import json

import pyarrow as pa
import pyarrow.parquet as pq

FIX = "tests/fixtures/data"
rows = json.load(open(f"{FIX}/fastchat_sample.json"))
table = pa.Table.from_pylist(rows)
pq.write_table(table, f"{FIX}/fastchat_sample.parquet", compression="snappy")
print(table.schema)

with open("../shared/data/datasets/gsm8k/train.jsonl") as f, open(f"{FIX}/gsm8k_sample.jsonl", "w") as g:
    for i, line in enumerate(f):
        if i == 16:
            break
        g.write(line)

"""Users' datasets in and out: rows from JSONL, Parquet, `datasets` folders and hub datasets in the layouts
the field uses (ours/TRL messages, the cauldron, question/answer columns, TRL preference), and result files.

    from idefics2.data import read_rows
    rows = read_rows("docvqa.parquet", columns="prompt=query.en,image=image,answers=answers")
    print(rows.layout)           # question/answer (query.en, image, answers)
    for row in rows:             # streamed: images are decoded row by row
        row.request_messages, row.request_images, row.answers, row.error
"""

from idefics2.data.images import load_image
from idefics2.data.rows import FIELDS, Row, RowStream, parse_columns, read_rows
from idefics2.data.sources import DataSourceError
from idefics2.data.writers import ResultWriter, answered_ids, id_key, open_writer, read_results

__all__ = [
    "FIELDS",
    "DataSourceError",
    "ResultWriter",
    "Row",
    "RowStream",
    "answered_ids",
    "id_key",
    "load_image",
    "open_writer",
    "parse_columns",
    "read_results",
    "read_rows",
]

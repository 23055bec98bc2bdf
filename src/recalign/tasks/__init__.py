"""The problems a method solves, independent of how it solves them.

- `ctr`: will the user like this item? Samples, the TALLRec and CoLLM protocols, bounded evaluation
  draws, warm/cold slices, AUC/UAUC (`ctr_report`).
- `next_item`: which item comes next? Leave-one-out and generative samples, evaluation cases, history
  masks, NDCG/HR/Recall/MRR@K (`ranking_report`).
- `text`: samples as prompt fields (the LLM layer renders them; it never reads a dataset).
- `identifiers`: items named in several facets (ID, categories, title spans) for TransRec.
"""

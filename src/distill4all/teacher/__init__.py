"""The teacher, shared by every stage that asks one: collect (answers to train on), eval's judge,
and train's distillation.

  client.py   OpenAI-compatible chat completions over aiohttp, with retries
  limiter.py  requests/tokens per minute and the in-flight window
  answers.py  answer every pending task of one teacher, N in flight, group-committed
  local.py    a local model served on 127.0.0.1 for the duration of a stage
  connect.py  a client for a configured teacher, remote or local
  cost.py     what answers cost, and a budget that is never overshot
  usage.py    token counts of answers that report no usage (their cost then estimated)

The exactly-once request ledger (tasks and their answers) is the run store's `store/tasks.py`.
"""

"""`finetune serve`: the model server (server), its request formats (protocol), request batching (batching),
Prometheus metrics (metrics) and the sampled request log (request_log). Below stages/: it may import
registry/, training/, tasks/ and common/."""

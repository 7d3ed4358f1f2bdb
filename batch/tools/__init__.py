"""Tools around the batch job, not the job: the demo (`python -m batch demo`) and the request-trace
generator and replayer it and the benchmarks use."""

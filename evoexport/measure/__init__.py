"""Measurements: latency on the CPU (bench.py) and GPU (bench_cuda.py) and its plot
(plot.py); what pruning keeps on real photos (eval.py, eval_data.py) and a trained
digits model (digits.py)."""

"""lsq-sweep: Learned Step Size Quantization for ResNets, as a Ray Tune ablation harness.

Nothing is imported here, so `import lsq.train` never pulls in Ray or pandas.
"""

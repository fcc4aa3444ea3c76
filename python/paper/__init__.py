"""The paper's experiments (Kolb et al., ICLR 2025): models, data, the DWF training loop
(Algorithm 2) and the pruning baselines. The command-line programs are python/train.py and
python/sweep.py."""

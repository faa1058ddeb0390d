"""repro: end-to-end reproduction of LoMaR, LocalMIM, ExtreMA and their MIM baselines."""

__version__ = "0.1.0"

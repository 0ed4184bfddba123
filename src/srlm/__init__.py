"""srlm: Self-Rewarding Language Models (Yuan et al., 2024) as a tool.

Each stage of the method is a plain function over records on disk, usable alone:

    from srlm import load_config, run                      # the whole loop
    from srlm.sft import train_sft                          # M0 -> M1 on IFT + EFT
    from srlm.prompts import generate_prompts               # few-shot prompt generation + filters
    from srlm.candidates import respond                     # N candidates per prompt
    from srlm.judging import judge, parse_score             # LLM-as-a-Judge, k samples
    from srlm.pairs import select_pairs                     # best vs worst, ties dropped
    from srlm.dpo import train_dpo                          # M(t) -> M(t+1)
"""
from .config import RunConfig, load_config
from .loop import run

__version__ = "0.1.0"
__all__ = ["RunConfig", "load_config", "run", "__version__"]

"""Scoring circuits as MIB does (Mueller et al. 2025, arXiv 2504.13151), against the
methods researchers use today.

Data flow, one module per step:

- :mod:`.prompts` -- discovery and held-out IOI prompts (other seed, other names) and their
  ABC counterfactuals.
- :mod:`.patching` -- exact activation patching per head (TransformerLens), by denoising and
  by noising; the important heads; precision, recall and F1.
- :mod:`.attribution` -- attribution patching (EAP) and EAP-IG, per head.
- :mod:`.faithfulness` -- f(C) with every head outside C patched from the counterfactual;
  curves over MIB's sizes; CPR and CMD.
- :mod:`.compare` -- every method's ranking scored on the same held-out prompts.
"""

from tl_superposition.evaluation.attribution import eap_ig_scores, eap_scores
from tl_superposition.evaluation.compare import (
    Comparison,
    Ranking,
    compare_methods,
    f1_table,
    score_rankings,
)
from tl_superposition.evaluation.faithfulness import MIB_FRACTIONS, Faithfulness, cpr_cmd
from tl_superposition.evaluation.patching import (
    head_patching_effects,
    important_heads,
    precision_recall_f1,
)
from tl_superposition.evaluation.prompts import abc_tokens, ioi_prompts, ioi_split, name_split

__all__ = [
    "abc_tokens",
    "ioi_prompts",
    "ioi_split",
    "name_split",
    "head_patching_effects",
    "important_heads",
    "precision_recall_f1",
    "eap_scores",
    "eap_ig_scores",
    "Faithfulness",
    "MIB_FRACTIONS",
    "cpr_cmd",
    "Ranking",
    "Comparison",
    "compare_methods",
    "score_rankings",
    "f1_table",
]

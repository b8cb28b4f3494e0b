"""Losses that fine-tune a drift to the tilt p* ∝ p_base · exp(g/λ); each exposes `loss` on a batch.

adjoint_matching (default, in methods/finetune.py's loop), adjoint_sampling, the score-matching
family (target, conditional, novel), cmcd (log-variance) and nets (PINN on an annealed path).
`get_solver(name)` builds the object used by `finetune(..., solver=name)`.
"""

SOLVERS = ("adjoint_matching", "adjoint_sampling", "target_score_matching",
           "conditional_score_matching", "novel_score_matching", "cmcd", "nets")


def get_solver(name: str, **options):
    """The loss object for `name` (None for adjoint_matching, whose loop lives in finetune)."""
    from .adjoint_sampling import AdjointSampling
    from .cmcd import CMCD
    from .nets import NETS
    from .score_matching import ConditionalScoreMatching, NovelScoreMatching, TargetScoreMatching

    table = {"adjoint_sampling": AdjointSampling, "target_score_matching": TargetScoreMatching,
             "conditional_score_matching": ConditionalScoreMatching,
             "novel_score_matching": NovelScoreMatching, "cmcd": CMCD, "nets": NETS}
    if name == "adjoint_matching":
        return None
    if name not in table:
        raise ValueError(f"solver must be one of {list(SOLVERS)}, got {name!r}")
    return table[name](**options)

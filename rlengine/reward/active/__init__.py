"""Active reward modeling (METHODS.md section 2): choose which comparisons to label by Fisher
information on the last layer of a reward model over frozen embeddings.

- embeddings: frozen (prompt, response) embeddings, cached on disk;
- model: the paper's MLP phi + bias-free w, fitted from scratch each round;
- selection: random, entropy, max difference, coreset, D-opt and past-aware D-opt;
- pools: items and in-prompt / cross-prompt candidate pools;
- simulation: the labelling loop with a simulated annotator or revealed labels;
- commands: `rlengine select` and `rlengine active-sim`.
"""

from rlengine.reward.active.embeddings import Embedder, cached_embeddings, load_embedder
from rlengine.reward.active.model import (
    PreferenceModel,
    PreferenceModelConfig,
    fit_preference_model,
)
from rlengine.reward.active.pools import ItemTable, candidate_pairs
from rlengine.reward.active.selection import STRATEGIES, dopt_scores, select
from rlengine.reward.active.simulation import ActiveSimConfig, simulate

__all__ = [
    "STRATEGIES",
    "ActiveSimConfig",
    "Embedder",
    "ItemTable",
    "PreferenceModel",
    "PreferenceModelConfig",
    "cached_embeddings",
    "candidate_pairs",
    "dopt_scores",
    "fit_preference_model",
    "load_embedder",
    "select",
    "simulate",
]

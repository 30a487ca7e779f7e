"""The study's plan: per task, the recipe directory, its baseline, the regularizer families swept
and how each run is sized and measured (``TaskPlan``, documented in study/sweep.py). To add a task,
add a ``TaskPlan`` to ``PLANS``; ``study/run_study.py`` trains and measures what is planned here."""

from __future__ import annotations

from study.sweep import Family, TaskPlan

# Manifold data for the alignment measurement: a strongly bent manifold (scale 10) in d = 128, so
# that reading z linearly off the chart (z = Aᵀx, the easy solution) gives input gradients that
# are far from the tangent spaces (docs/DESIGN.md §3.8: nonlinear generator).
MANIFOLD_DATA = ("--data.init_args.ambient_dim", "128", "--data.init_args.scale", "10.0",
                 "--model.model.init_args.d_in", "128")


def adversarial(recipe: str) -> Family:
    """PGD adversarial training replaces the task loss: its strength is the attack radius ε (study/sweep.py)."""
    return Family(recipe, "epsilon")


DIGIT_MANIFOLD_SIZE = ("--trainer.max_epochs", "12")
CNN_HEAD_LAYERS = ("model.features.5", "model.head.2", "output")
DIGIT_MANIFOLD_FAMILIES = ("adversarial", "grad_norm", "off_manifold_grad", "off_manifold_noise")

# the MLP's families: the off-manifold penalties, GradientNorm, adversarial training and (added
# 2026-12-06) the off-manifold share of the gradient, OffManifoldGradientPenalty(normalize=True)
DIGIT_MANIFOLD_MLP_FAMILIES = {**{f: f for f in DIGIT_MANIFOLD_FAMILIES}, "adversarial": adversarial("adversarial"),
                     "off_manifold_grad_share": "off_manifold_grad_share"}

TEXT_MEASURE = dict(max_samples=64, lib_sources=8, lib_edge_sources=1, lib_jacobian_dtype="float32",
                    circuit=True, circuit_zero=True)

PLANS: dict[str, TaskPlan] = {
    # the headline task: decoder-generated digits, exact tangents (recipes/digit_manifold); 12 of the
    # recipe's 30 epochs (384 steps: validation accuracy ~1.5 points below its plateau, the 200-step
    # warm-ups end in the first half) and 256 measured examples, for the 2-core machine's budget
    "digit_manifold": TaskPlan("recipes/digit_manifold", "baseline", DIGIT_MANIFOLD_MLP_FAMILIES,
                               extra=DIGIT_MANIFOLD_SIZE, measure=dict(max_samples=256)),
    # the headline cells at the recipe's full 30 epochs (standard training's alignment keeps falling
    # with training, so the 12-epoch sweep above flatters the baseline); recipe strengths only; the
    # off-manifold share of the gradient (OffManifoldGradientPenalty(normalize=True)) added 2026-12-06
    "digit_manifold_30ep": TaskPlan("recipes/digit_manifold", "baseline",
                                    DIGIT_MANIFOLD_MLP_FAMILIES,
                                    multipliers=(1.0,), measure=dict(max_samples=256)),
    # the same cells trained twice as long (60 epochs): past epoch 30 standard training's validation
    # accuracy is flat (seed 0: 96-97 %) while its alignment keeps falling (0.47 -> 0.40); does the
    # regularized models' lead grow
    "digit_manifold_60ep": TaskPlan("recipes/digit_manifold", "baseline",
                                    DIGIT_MANIFOLD_MLP_FAMILIES,
                                    multipliers=(1.0,), extra=("--trainer.max_epochs", "60"),
                                    measure=dict(max_samples=256)),
    "digit_manifold_cnn": TaskPlan("recipes/digit_manifold", "cnn_baseline",
                                   {**{f: f"cnn_{f}" for f in DIGIT_MANIFOLD_FAMILIES},
                                    "adversarial": adversarial("cnn_adversarial")},
                                   extra=DIGIT_MANIFOLD_SIZE,
                                   # LIB over the classifier head: the conv blocks' sections have no closed
                                   # form, and exact LIB through them (1024 and 512 units) took 150 s CPU per run
                                   measure=dict(max_samples=256, node_layers=CNN_HEAD_LAYERS)),
    "digits": TaskPlan("recipes/digits", "baseline",
                       {f: f for f in ("grad_norm", "off_manifold", "degeneracy", "interaction", "connection_cost")},
                       llc=True),
    "manifold": TaskPlan("recipes/manifold", "baseline",
                         {**{f: f for f in ("grad_norm", "off_manifold_grad", "off_manifold_noise", "degeneracy")},
                          "adversarial": adversarial("adversarial")},
                         extra=MANIFOLD_DATA, llc=True),
    # WeightSparsity's strength is its density (one recipe each, not swept); circuits with mean and
    # zero ablation (issue 15); 1000 full-batch steps: every cpu structure recipe groks by step ~650
    # (NoisePenalty at its recipe weight never does, GradientNorm 10x not on every seed)
    "modular_addition": TaskPlan("recipes/modular_addition", "cpu",
                                 {"interaction": "cpu_interaction", "degeneracy": "cpu_degeneracy",
                                  # the smoothness families: a separate report (results/modular_addition_smoothness)
                                  "grad_norm": "cpu_grad_norm", "noise": "cpu_noise"},
                                 fixed={"weight_sparsity_d0.25": "cpu_weight_sparsity",
                                        "weight_sparsity_d0.1": "cpu_weight_sparsity_strong", "l0": "cpu_l0",
                                        "weight_sparsity_all_d0.1": "cpu_weight_sparsity_all",
                                        "weight_sparsity_all_d0.25": "cpu_weight_sparsity_all_mild",
                                        # twice as wide, dense and on every matrix (Gao et al.'s wider and sparser)
                                        "wide_baseline": "cpu_wide",
                                        "wide_weight_sparsity_all_d0.1": "cpu_wide_weight_sparsity_all",
                                        "l0_target0.4": "cpu_l0_target", "l0_target0.1": "cpu_l0_target_strong"},
                                 extra=("--trainer.max_steps", "1000"), llc=True,
                                 measure=dict(circuit=True, circuit_zero=True, edge_ablation=True)),
    # 2000 of the recipe's 3000 steps, for the 2-core machine: validation loss is still falling by
    # 0.014-0.027 per 250 steps at the end (1.235 -> 1.221 at steps 1750 -> 2000, baseline seed 1;
    # study/README.md). GradientNorm (not a structure penalty; its double backward costs ~2x a step)
    # is reported apart, without circuits: results/text_grad_norm (--families baseline grad_norm)
    "text": TaskPlan("recipes/text", "baseline", {"degeneracy": "degeneracy", "grad_norm": "grad_norm"},
                     fixed={"weight_sparsity_d0.5": "weight_sparsity", "weight_sparsity_d0.25": "weight_sparsity_strong"},
                     extra=("--trainer.max_steps", "2000", "--trainer.val_check_interval", "250"),
                     # 64 positions: exact LIB needs 64·k VJPs per attention section and window. Circuits
                     # with mean and zero ablation (issue 15): a search's greedy pass is ~1500 forward passes
                     # over the 64 windows; with both ablations one run's compare took 555 s of CPU (baseline
                     # seed 0, load 3). No edge ablation: up to one section pass per output feature and
                     # bisection step, in three bases
                     measure=TEXT_MEASURE),
    # the recipe's full 3000 steps (validation loss every 250), for the cell the 2000-step sweep found
    # within the 1-point budget with the largest structural gain: does the longer run change the
    # comparison (issue 16, plateau). The committed report compares baseline and density 0.5 only
    # (--families baseline weight_sparsity_d0.5); the other cells are trained by name for
    # study/narrow_circuits.py: WeightSparsity 0.25 (outside the budget at 2000 steps) and 0.1 (the third
    # density, measured without circuits or edge ablation: results/text_3000_weight_sparsity_d0.1), the same
    # densities on every matrix with the embeddings and unembedding (weight_sparsity_all_d0.5/_d0.25),
    # a model twice as wide at density 0.1 on every matrix (wide_weight_sparsity_all_d0.1: Gao et
    # al.'s wider-and-sparser comparison) and its dense counterpart (wide_baseline), and
    # ActivationSparsity at the recipe's 0.05 (--multipliers 3 cost 3.4 points of accuracy, 10x ~19
    # at step 500 on seed 0)
    "text_3000": TaskPlan("recipes/text", "baseline", {"activation_sparsity": "activation_sparsity"},
                          fixed={"weight_sparsity_d0.5": "weight_sparsity", "weight_sparsity_d0.25": "weight_sparsity_strong",
                                 "weight_sparsity_d0.1": "weight_sparsity_strongest",
                                 "weight_sparsity_all_d0.5": "weight_sparsity_all",
                                 "weight_sparsity_all_d0.25": "weight_sparsity_all_strong",
                                 "wide_weight_sparsity_all_d0.1": "wide_weight_sparsity_all",
                                 "wide_baseline": "wide_baseline"},
                          multipliers=(1.0,), extra=("--trainer.val_check_interval", "250"),
                          # mean-ablation circuits only: zero ablation changed the 2000-step circuits by < 2 % in nodes
                          # and costs a second search (4-5 min of CPU per run); edge ablation in the three bases
                          measure={**TEXT_MEASURE, "circuit_zero": False, "edge_ablation": True}),
}

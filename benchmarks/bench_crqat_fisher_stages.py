"""CR-QAT (+ Fisher) on an MMDetection DETR with the paper's two curriculum stages (backbone, then everything it
feeds) instead of the family's three: ``bench_fisher_mmdet.py`` with each recipe's ``curriculum.stages`` set.

    python benchmarks/bench_crqat_fisher_stages.py --bits w4a8,w4a4 --variants crqat-2st,crqat-fisher-2st --seeds 0 --threads 1

Every ``bench_fisher_mmdet.py`` argument applies; a variant ending in ``-2st`` is that variant with two stages.
Two more variants take CR-QAT + Fisher apart: ``crqat-mp`` (CR-QAT with Fisher mixed precision only) and
``crqat-reg`` (CR-QAT with the Fisher-trace regulariser only), each also with ``-2st``. It measured why CR-QAT +
Fisher broke on the slim DINO (README, Results, "DINO, `crqat-dino`").
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_fisher  # noqa: E402

TWO_STAGES = [{"name": "backbone", "modules": ["backbone"], "outputs": ["backbone"]},
              {"name": "neck_head", "modules": [r"re:^(?!backbone(\.|$))"], "outputs": []}]
_variant_recipe = bench_fisher.variant_recipe


ABLATIONS = {"crqat-mp": "fisher_regularizer", "crqat-reg": "mixed_precision"}  # variant -> the part left out


def variant_recipe(bits, variant, critical, avg_bits, reg_weight, reg_every):
    two = variant.endswith("-2st")
    base = variant[:-4] if two else variant
    recipe = _variant_recipe(bits, "crqat-fisher" if base in ABLATIONS else base, critical, avg_bits, reg_weight,
                             reg_every)
    if base in ABLATIONS:
        del recipe[ABLATIONS[base]]
    if two or base in ABLATIONS:
        recipe["name"] = f"{bits}-{variant}"
    if two:
        recipe["curriculum"] = dict(recipe["curriculum"], stages=TWO_STAGES)
    return recipe


if __name__ == "__main__":
    import bench_fisher_mmdet

    bench_fisher_mmdet.variant_recipe = variant_recipe
    raise SystemExit(bench_fisher_mmdet.main(sys.argv[1:]))

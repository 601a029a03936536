#!/usr/bin/env bash
# The measurements behind recipes/finetune.py's defaults (docs/recipe.md, "How the defaults were chosen").
# Every run: two CPU processes (accelerate launch --multi_gpu, which the recipe runs on its CPU backend), one thread each; all_results.json of each run is copied
# to docs/results/recipe/<name>.json. Usage: recipes/recipe_defaults.sh NAME [recipe flags...]
#   tasks (built by recipes/make_image_folder.py into $DATA, default outputs/data/):
#     fm-1000   Fashion-MNIST test images, 100 train + 100 test per class, renamed classes (new head)
#     fm-5000   the same with 500 + 500 per class
#     digits    scikit-learn's digits, 140 train per class (1400) + the other 397 for test: the held-out task
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-outputs/data}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1
[ -d "$DATA/fm-1000" ] || $PY recipes/make_image_folder.py --source fashion_mnist --train_per_class 100 --test_per_class 100 --seed 1 --output_dir "$DATA/fm-1000"
[ -d "$DATA/fm-5000" ] || $PY recipes/make_image_folder.py --source fashion_mnist --train_per_class 500 --test_per_class 500 --seed 2 --output_dir "$DATA/fm-5000"
[ -d "$DATA/digits" ] || $PY recipes/make_image_folder.py --source digits --output_dir "$DATA/digits"
name=$1; shift
mkdir -p outputs/recipe-defaults docs/results/recipe
start=$(date +%s)
$PY -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
    recipes/finetune.py --output_dir "outputs/recipe-defaults/$name" --overwrite_output_dir "$@" > "outputs/recipe-defaults/$name.log" 2>&1
echo "$name: $(( $(date +%s) - start )) s wall"
$PY - "$name" "$(( $(date +%s) - start ))" <<'PYEOF'
import json, sys, pathlib
name, wall = sys.argv[1], int(sys.argv[2])
r = json.loads(pathlib.Path(f"outputs/recipe-defaults/{name}/all_results.json").read_text())
r["wall_seconds"] = wall
pathlib.Path(f"docs/results/recipe/{name}.json").write_text(json.dumps(r, indent=2, sort_keys=True) + "\n")
b = r[r["baseline"]]
print(f"{name}: baseline {r['baseline']} {b['accuracy']:.2f}, pooled off the shelf {r['pooled_off_the_shelf']['accuracy']:.2f}, "
      f"pooled fine-tuned {r['pooled_finetuned']['accuracy']:.2f} ({r['pooled_finetuned']['accuracy'] - b['accuracy']:+.2f})")
PYEOF

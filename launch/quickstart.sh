#!/usr/bin/env bash
# The main job, on CPU in a few minutes: a tiny two-stage world-action-model run over locally generated
# OXE-format data, a LeRobot v3.0 dataset and captioned videos, then the FLOP budget report and a PyTorch export.
# RUN_DIR (default runs/quickstart) holds everything it writes; re-running resumes where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_venv.sh export
PY=.venv/bin/python
RUN=${RUN_DIR:-runs/quickstart}
STEPS=${STEPS:-50}
DATASETS=fractal20220817_data,bridge,taco_play,droid,lerobot:lerobot_sim
export JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=2
mkdir -p "$RUN"

echo "== 1/8 robot episodes: 4 OXE-format datasets (published feature specs) and a LeRobot v3.0 dataset (H.264)"
[ -f "$RUN/oxe/.done" ] || { $PY -m data_pipelines.make_oxe_like --out="$RUN/oxe" \
  --datasets=fractal20220817_data,bridge,taco_play,droid --episodes=16 && touch "$RUN/oxe/.done"; }
[ -f "$RUN/oxe/lerobot_sim/meta/info.json" ] || $PY -m data_pipelines.make_lerobot --out="$RUN/oxe/lerobot_sim" \
  --episodes=16
echo "== 2/8 normalization statistics"
[ -f "$RUN/oxe/norm_stats.json" ] || $PY -m data_pipelines.compute_stats --data_dir="$RUN/oxe" --datasets=$DATASETS \
  --out="$RUN/oxe/norm_stats.json"
echo "== 3/8 captioned videos -> clip shards"
[ -f "$RUN/videos/captions.jsonl" ] || $PY -m data_pipelines.make_videos --out="$RUN/videos" --num_videos=8
$PY -m wamjax.jobs.ingest_video --videos="$RUN/videos/*.mp4,$RUN/videos/*.mkv" --captions="$RUN/videos/captions.jsonl" \
  --out="$RUN/video_shards" --num_frames=9 --fps=8 --resolution=32,32 --num_shards=2 --workers=1
echo "== 4/8 instruction and caption embeddings (a random tiny UMT5 encoder: no weights download here)"
[ -f "$RUN/text_cache.safetensors" ] || $PY -m wamjax.jobs.text_cache --encoder=tiny:32 --max_length=8 \
  --datasets=$DATASETS --data_dir="$RUN/oxe" --video_shards="$RUN/video_shards" --out="$RUN/text_cache.safetensors"

echo "== 5/8 train: video_pretrain (robot episodes as video + captioned clips), then action_tune (with actions, two"
echo "   cameras tiled into one frame: the primary and wrist cameras of taco_play, droid and the LeRobot dataset)"
set +e
$PY -m wamjax.main --config=configs/wam.py:size=tiny,stage=all --workdir="$RUN/train" \
  --config.data.source=oxe --config.data.data_dir="$RUN/oxe" --config.data.stats_path="$RUN/oxe/norm_stats.json" \
  --config.data.datasets=$DATASETS \
  --config.data.video_shards="$RUN/video_shards" --config.data.video_weight=0.5 \
  --config.text.cache="$RUN/text_cache.safetensors" --config.train.steps="$STEPS" \
  --config.data.eval_fraction=0.2 \
  --config.stages.video_pretrain.budget_flops=2e9 --config.stages.action_tune.budget_flops=4e9 \
  --config.stages.action_tune.datasets=taco_play,droid,lerobot:lerobot_sim --config.stages.action_tune.cameras=primary,wrist \
  --alsologtostderr 2>&1 | grep --line-buffered -E "\] (\[|stage|mesh|data|text|vae|init_from|param)|Error|error"
rc=${PIPESTATUS[0]}
set -e
[ "$rc" = 0 ] || { echo "training exited with $rc (75 = preempted: run this script again to resume)"; exit "$rc"; }

echo "== 6/8 what the run cost, from its logs alone"
$PY -m wamjax.flops.report --workdir="$RUN/train" --plot="$RUN/budget.png"
$PY - "$RUN/train/metrics.jsonl" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
for stage in dict.fromkeys(r["stage"] for r in rows):
    s = [r for r in rows if r["stage"] == stage]
    print(f"{stage}: loss {s[0]['loss']:.3f} at step {s[0]['step']} -> {s[-1]['loss']:.3f} at step {s[-1]['step']}")
PYEOF

echo "== 7/8 export to PyTorch (diffusers transformer + whole WAM as safetensors)"
$PY -m wamjax.export.to_torch --checkpoint="$RUN/train/checkpoints" --out="$RUN/export"
ls -l "$RUN/export" "$RUN/export/transformer"

echo "== 8/8 offline evaluation on the held-out episodes (data.eval_fraction)"
$PY -m wamjax.eval.offline --checkpoint="$RUN/train/checkpoints" --data_dir="$RUN/oxe" --num_batches=1 \
  --out="$RUN/eval"
echo "eval: table above, frame grids $RUN/eval/*.png"
echo "done: budget plot $RUN/budget.png, export $RUN/export, eval grids $RUN/eval, TensorBoard logs $RUN/train/tensorboard"

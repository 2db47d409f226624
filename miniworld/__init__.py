"""miniworld: a procedural image-text world and a tiny CLIP pretrained on it.

Stand-in for (CLIP, LAION, ImageNet and its shifts) on a machine with no GPU and no downloads.

The world. Every 32x32 RGB image shows one object: SHAPE x COLOUR = 12 x 8 = 96 classes ("red star"),
drawn in one of 5 STYLES (photo: textured background, shading, drop shadow, sensor noise; sketch: paper,
hatching and outline strokes in the object's colour; cartoon: flat fill, thick dark outline; painting:
blur, colour jitter, brush streaks; pixel: blocky, posterised), on one of 8 named BACKGROUNDS (grass,
sand, sky, brick, snow, night, wood, water), with a fill PATTERN (solid/striped/dotted/checkered), a
size, a position and a rotation. Rendering is vectorised numpy, deterministic from (seed, index) via a
counter-based hash RNG, and cached as .npy under cache_dir(), keyed by a hash of the world config.
Every image has captions re-sampled from a grammar of style/background/pattern/size/position phrases,
synonyms and filler sentences (a vocabulary of several hundred words, see WordTokenizer).

The tiny CLIP is open_clip's own CLIP class, config `miniclip` (assets/miniclip.json: ViT patch 8, width
128, 4 layers, embed 128; 2-layer text tower, context 24) with the word-level WordTokenizer (421 ids,
<eot> highest, unknown words raise). Pretrained with open_clip's ClipLoss on 60k captioned corpus images of
all styles / classes / attributes, batches made of groups of 8 images sharing (style, background, colour)
so that shape, pattern, size and position must be read too. Rebuild the committed checkpoint with

    python -m miniworld pretrain            # writes assets/miniclip.pt (1500 steps x 256)

(8.0 min on this 2-core machine when it is otherwise idle). The learned logit scale ended at 24.8.
PREPROCESS gives the normalisation.

The downstream task (load_task), shaped like ImageNet and its shifts (chance level in brackets):
  train     kind train    20 classes = 5 shapes x 4 colours, photo style, 10k images, spurious cue: 90% of
                          each class on its own background. Its "captions" stand in for a captioner's
                          output (ARF's text-compensated anchors), sampled from the same caption grammar.
  heldout   kind heldout  1k, same distribution as train, for model selection (never select on test).
  id        kind id       2k, same distribution as train (5%).
  sketch / cartoon / painting / pixel   kind ood   1.5k each, the 20 classes in the other styles, random
                          background (5%).
  anticue   kind ood      1.5k, photo style, every image on a background that is NOT its class's (5%).
  zs_classes  kind zeroshot  1.5k, 16 classes whose shapes AND colours never occur in fine-tuning (6.25%).
  zs_pattern  kind zeroshot  1.5k, 4-way fill pattern (solid/striped/dotted/checkered) of large objects of
                          any class, own templates: an attribute the downstream task does not need (25%).
The task shapes were chosen (from the checkpoint's per-shape zero-shot accuracy) so zero-shot sits near
70%: room for fine-tuning to gain 20+ points in distribution.

Measured with the repo's own recipes (`python bench/reproduce.py`, RESULTS.md; FT = baselines.py
--method ft: image tower + head initialised from the zero-shot head, 300 steps x batch 128, lr 1e-4,
RandomResizedCrop scale (0.5, 1); mean of seeds 0, 1, 2):
                 id    sketch cartoon painting pixel anticue | OOD mean | zs_classes zs_pattern
  zero-shot      69.2  69.5   74.9    72.7     67.6  76.6    | 72.3     | 72.7       52.1
  FT (3 seeds)   95.3  43.3   58.6    59.8     58.4  55.9    | 55.2     | 61.6       47.4
  FT - ZS       +26.1                                        | -17.1    | -11.1      -4.7

Other entry points: write_pool(out_dir) (ARF retrieval pool, PNG + TSV), `python -m miniworld pool --out
DIR`, `python -m miniworld show --out grid.png`. load_miniclip() never pretrains: a missing checkpoint is
an error that says how to build it.

The package, one job per file (import order world <- text <- model, task):
  world.py     the knobs (shapes, colours, styles, ...), cache_dir(), world_config(), the hash RNG, the renderer
  text.py      the caption grammar and WordTokenizer
  model.py     the tiny CLIP: create / preprocess / pretrain / save / load
  task.py      the downstream task (load_task), the ARF retrieval pool (write_pool), show()
  __main__.py  the command line
Everything is re-exported here (`import miniworld as mw; mw.render_batch(...)`). Set a knob on the
module that reads it (e.g. monkeypatch miniworld.task.TASK_SIZES): these names are copies.
"""
from .world import (BACKGROUNDS, BG_BASE, COLOURS, IMAGE_SIZE, MAX_TILT, PATTERNS, RENDER_VERSION, SHAPES, SIZES,
                    STYLES, SUPERSAMPLE, _digest, _uniform, cache_dir, render, render_batch, render_many,
                    sample_attrs, world_config)
from .text import (BG_PHRASES, COLOUR_FACTS, COLS, COMMENTS, CONTEXT_LENGTH, OPENERS, PATTERN_ADJS, PATTERN_PHRASES,
                   ROTATION_WORDS, ROWS, SHAPE_FACTS, SIZE_WORDS, STYLE_DETAILS, STYLE_PHRASES, WordTokenizer, _split,
                   caption, caption_words, captions)
from .model import (ASSETS, AUG_SCALE, CHECKPOINT, CONFIG_JSON, PREPROCESS, PRETRAIN_BATCH, PRETRAIN_GROUP,
                    PRETRAIN_IMAGES, PRETRAIN_LR, PRETRAIN_SEED, PRETRAIN_STEPS, PRETRAIN_WD, augment,
                    create_miniclip, load_miniclip, pretrain, pretrain_corpus, save_miniclip, to_tensor)
from .task import (CUE_STRENGTH, PATTERN_TEMPLATES, POOL_SEED, TASK_CLASSES, TASK_COLOURS, TASK_SHAPES, TASK_SIZES,
                   TASK_SPLITS, TASK_TEMPLATES, ZS_CLASSES, ZS_COLOURS, ZS_SHAPES, home_background, load_task, show,
                   write_pool)

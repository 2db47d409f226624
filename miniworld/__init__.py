"""miniworld: a procedural image-text world and a tiny CLIP pretrained on it.

Stand-in for (CLIP, LAION, ImageNet and its shifts) on a machine with no GPU and no downloads.

The world. Every 32x32 RGB image shows one object: SHAPE x COLOUR = 12 x 8 = 96 kinds ("red star"),
drawn in one of 5 STYLES (photo: textured background, shading, drop shadow, sensor noise; sketch: paper,
light hatching, the fill pattern and the outline inked in the object's hue; cartoon: flat fill, thick dark
outline; painting: blur, colour jitter, brush streaks; pixel: blocky, posterised), on one of 8 named
BACKGROUNDS (grass, sand, sky, brick, snow, night, wood, water), with a fill PATTERN (solid / striped /
dotted / checkered), a size, a position, a rotation and a LIGHT level (dim / normal / bright). Rendering
is vectorised numpy, deterministic from (seed, index) via a counter-based hash RNG, and cached as .npy
under cache_dir(), keyed by a hash of the world config. Every image has captions re-sampled from a
grammar of style / background / pattern / size / position / light phrases, synonyms and filler sentences
(a vocabulary of ~450 words, see WordTokenizer).

The tiny CLIP is open_clip's own CLIP class, config `miniclip` (assets/miniclip.json: ViT patch 8, width
128, 4 layers; 3-layer text tower of width 128, context 24; joint embedding 256) with the word-level
WordTokenizer (<eot> highest id, unknown words raise). Pretrained with open_clip's ClipLoss on 60k
captioned corpus images of all styles / kinds / attributes, batches made of groups of 8 images sharing
(style, background, colour) so that shape, pattern, size and position must be read too. Rebuild the
committed checkpoint with

    python -m miniworld pretrain            # writes assets/miniclip.pt (1500 steps x 256)

(11.9 min on this 2-core machine when it is otherwise idle: 1.3 min rendering the corpus, 10.5 min
training; final loss 1.23, learned logit scale 23.9; 6.2 MB). PREPROCESS gives the normalisation.

The downstream task (load_task), shaped like ImageNet and its shifts (chance level in brackets):
  train     kind train    24 fine-grained classes = 4 shapes x 2 colours x 3 fill patterns ("striped yellow
                          diamond"), photo style, 10k images; background, size, position, angle and light
                          at random. Its "captions" stand in for a captioner's output (ARF's text anchors).
                          The methods train on 10 per class by default (FT_RECIPES' shots=10, drawn by the
                          seed; --shots 0 = all 10k): the regime where the papers' claims hold (below).
  heldout   kind heldout  1k, same distribution as train, for model selection (never select on test).
  id        kind id       2k, same distribution as train (4.2%).
  sketch / cartoon / painting / pixel   kind ood   1.5k each, the 24 classes in the other styles (4.2%).
  zs_classes  kind zeroshot  1.5k, 16 classes whose shapes AND colours never occur in fine-tuning (6.25%).
  zs_scene    kind zeroshot  1.5k, 8-way: where the object is ("on the grass", "at night", ...), read from
                          the background, which the task never needs and varies at random (12.5%).

Two regimes, chosen from the regime map (docs/regime_map.md, `python reproduce/regime.py`): the default, 10
images per class, where FT gains over zero-shot and forgets (shifts and zero-shot transfer drop), WiSE-FT
bulges and Lipsum-FT, KD and CAR-FT buy OOD accuracy for at most 1 ID point, as on ImageNet in the papers;
and the full set (`--shots 0`), where FT learns what the pretrained features hold, zero-shot adds nothing
FT lacks and Lipsum-FT and KD pay 4-5 ID points for their OOD gain.

Measured on this task: RESULTS.md (`python reproduce/reproduce.py --workers 2`, with the text-space
diagnostics of reproduce/diagnostics.py). The classes were chosen by the checkpoint's zero-shot accuracy
on fresh renders alone (studies/choose_classes.py, docs/choose_classes.md). Why the world looks as it does,
what changed from RENDER_VERSION 2 (issue #18) and the probes behind it: docs/miniworld.md.

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
from .world import (BACKGROUNDS, BG_BASE, COLOURS, IMAGE_SIZE, LIGHTS, MAX_TILT, PATTERNS, RENDER_VERSION, SHAPES, SIZES,
                    STYLES, SUPERSAMPLE, _digest, _uniform, cache_dir, render, render_batch, render_many,
                    sample_attrs, world_config)
from .text import (BG_PHRASES, COLOUR_FACTS, COLS, COMMENTS, CONTEXT_LENGTH, LIGHT_PHRASES, OPENERS, PATTERN_ADJS,
                   PATTERN_DETAILS, PATTERN_PHRASES,
                   ROTATION_WORDS, ROWS, SHAPE_FACTS, SIZE_WORDS, STYLE_DETAILS, STYLE_PHRASES, WordTokenizer, _split,
                   caption, caption_words, captions)
from .model import (ASSETS, AUG_SCALE, CHECKPOINT, CONFIG_JSON, PREPROCESS, PRETRAIN_BATCH, PRETRAIN_GROUP,
                    PRETRAIN_IMAGES, PRETRAIN_LR, PRETRAIN_SEED, PRETRAIN_STEPS, PRETRAIN_WD, augment,
                    create_miniclip, load_miniclip, pretrain, pretrain_corpus, save_miniclip, to_tensor)
from .task import (POOL_SEED, SCENE_NAMES, SCENE_TEMPLATES, TASK_CLASSES, TASK_COLOURS, TASK_PATTERNS, TASK_SHAPES,
                   TASK_SIZES, TASK_SPLITS, TASK_TEMPLATES, ZS_CLASSES, ZS_COLOURS, ZS_SHAPES, class_attrs, class_name,
                   load_task, show, write_pool)

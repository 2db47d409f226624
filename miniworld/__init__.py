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
  heldout   kind heldout  1k, same distribution as train, for model selection (never select on test).
  id        kind id       2k, same distribution as train (4.2%).
  sketch / cartoon / painting / pixel   kind ood   1.5k each, the 24 classes in the other styles (4.2%).
  zs_classes  kind zeroshot  1.5k, 16 classes whose shapes AND colours never occur in fine-tuning (6.25%).
  zs_scene    kind zeroshot  1.5k, 8-way: where the object is ("on the grass", "at night", ...), read from
                          the background, which the task never needs and varies at random (12.5%).

What changed from RENDER_VERSION 2 (issue #18), and why:
  * No shortcut. The old task trained and tested on 20 shape x colour classes with 90% of each class on its
    own background: colour + background named the class, and FT's +26 ID points came from that cue (on
    random backgrounds FT was *worse* than zero-shot). Backgrounds are now random in every split; the
    cue-reversed `anticue` split went with the cue.
  * Headroom by real features. Classes are (shape, colour, pattern) triples, so classes differ in the
    fill pattern alone: the pattern is drawn (not a cue); two thirds of the captions name it, but only 11%
    as the class's own phrase ("a striped yellow diamond"; the rest "a yellow diamond with stripes", "a
    banded ..."), and zero-shot reads it poorly, so FT has a real feature to learn. The
    classes were chosen by the new checkpoint's zero-shot accuracy on fresh renders alone
    (bench/choose_classes.py, docs/choose_classes.md), before any fine-tuning run on them.
  * The pattern is legible in every style: the sketch style inks the pattern (it used to hatch the whole
    object, which hid it; zero-shot sketch accuracy on pattern classes sat near its floor).
  * A richer text space: a LIGHT attribute with its phrases, pattern-detail sentences, a joint embedding
    of 256 (was 128) and 3 text layers (was 2). Measured, it did not widen what random texts probe
    (participation ratio 10.2, was 10.0; bench/diagnostics.py in RESULTS.md).
  * Zero-shot transfer: `zs_pattern` (the pattern is now the task) gave way to `zs_scene`.

Measured with the repo's own recipes (`python bench/reproduce.py --workers 2`, RESULTS.md; FT = baselines.py
--method ft: image tower + head initialised from the zero-shot head, 300 steps x batch 128, lr 1e-4,
RandomResizedCrop scale (0.5, 1); mean of seeds 0, 1, 2):
                 id    sketch cartoon painting pixel | OOD mean | zs_classes zs_scene
  zero-shot      59.8  45.3   47.5    46.6     54.1  | 48.4     | 71.7       91.5
  FT (3 seeds)   77.4  37.7   32.3    52.7     55.4  | 44.5     | 70.5       88.1
  FT - ZS       +17.7  -7.6  -15.2    +6.1     +1.3  | -3.9     | -1.2       -3.4
FT gains by reading the pattern, forgets sketch and cartoon, and carries its pattern reading into painting
and pixel; RESULTS.md checks these numbers against the issue's bars.

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

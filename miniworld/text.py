"""Text for the world: the caption grammar (phrase banks, caption(), captions()) and the word-level tokenizer."""
import random
import re

import numpy as np
import torch

from .world import BACKGROUNDS, COLOURS, LIGHTS, PATTERNS, SHAPES, SIZES, STYLES, _uniform

CONTEXT_LENGTH = 24

# ----------------------------------------------------------------------------------------------------
# Captions: a small grammar with synonyms, so the text side can describe every nuisance factor.
STYLE_PHRASES = {
    "photo": ["a photo of", "a photograph of", "a snapshot of", "a close up photo of", "a camera picture of",
              "a realistic photo of", "a grainy photo of", "a bright photo of", "a digital photo of"],
    "sketch": ["a sketch of", "a pencil drawing of", "a line drawing of", "a pencil sketch of",
               "an ink drawing of", "a hand drawn sketch of", "a rough doodle of", "a hatched drawing of"],
    "cartoon": ["a cartoon of", "a clipart of", "an illustration of", "a comic drawing of",
                "a vector graphic of", "a flat icon of", "a sticker of", "an animated cartoon of"],
    "painting": ["a painting of", "an oil painting of", "a watercolor of", "an acrylic painting of",
                 "an impressionist painting of", "a canvas painting of", "an artwork of", "a brush painting of"],
    "pixel": ["a pixel art of", "a pixel art image of", "a retro game sprite of", "an eight bit image of",
              "a low resolution render of", "a blocky mosaic of", "a pixelated image of", "a video game sprite of"]}
STYLE_DETAILS = {
    "photo": ["with a soft shadow", "with natural lighting", "taken with a camera", "with realistic shading",
              "with film grain", "casting a shadow"],
    "sketch": ["drawn with thin lines", "with pencil hatching", "on white paper", "with scribbled strokes",
               "with coloured pencil lines", "with crosshatched shading"],
    "cartoon": ["with a thick black outline", "with flat colours", "with bold outlines", "in a simple flat style",
                "with crisp edges", "with a dark border"],
    "painting": ["with visible brush strokes", "with smeared paint", "with soft blurry edges",
                 "in an artistic style", "with rich textures", "with dabs of paint"],
    "pixel": ["with chunky pixels", "with jagged edges", "in a retro style", "with a limited palette",
              "with square blocks", "from an old computer game"]}
BG_PHRASES = {
    "grass": ["on the grass", "on a green lawn", "in a grassy meadow", "in a field of grass", "on the turf",
              "in a park"],
    "sand": ["on the sand", "on a sandy beach", "in the desert", "on golden dunes", "on dry sand",
             "near the seaside"],
    "sky": ["in the sky", "against a cloudy sky", "among the clouds", "up in the air", "under a bright sky",
            "high above the ground"],
    "brick": ["on a brick wall", "in front of bricks", "against a brick wall", "on old masonry",
              "beside a stone building", "on a wall of bricks"],
    "snow": ["in the snow", "on a snowy field", "on white snow", "in a winter landscape", "on frozen ground",
             "in a snowstorm"],
    "night": ["at night", "in the dark", "under a starry sky", "against the night sky", "at midnight",
              "in the darkness"],
    "wood": ["on wood", "on a wooden table", "on a plank floor", "on a timber board", "on an oak desk",
             "on the wooden floor"],
    "water": ["in the water", "on a lake", "floating on the sea", "on the waves", "in the ocean",
              "in a swimming pool"]}
SIZE_WORDS = {"small": ["small", "tiny", "little", "miniature", "petite"],
              "medium": ["medium", "medium sized", "regular sized", "ordinary", "average sized"],
              "large": ["large", "big", "huge", "giant", "enormous"]}
PATTERN_ADJS = {"solid": ["solid", "plain", "unpatterned", "uniformly coloured"],
                "striped": ["striped", "stripy", "banded", "pinstriped"],
                "dotted": ["dotted", "spotted", "polka dot", "speckled"],
                "checkered": ["checkered", "checked", "chequered", "plaid"]}
PATTERN_PHRASES = {"solid": ["with no pattern", "in a single plain colour", "with a solid fill"],
                   "striped": ["with stripes", "with a striped pattern", "covered in stripes"],
                   "dotted": ["with dots", "with a dotted pattern", "covered in polka dots"],
                   "checkered": ["with a checkerboard pattern", "with a checkered pattern", "covered in squares"]}
PATTERN_DETAILS = {"solid": ["it has one flat colour", "there is no texture on it", "its surface is even"],
                   "striped": ["the stripes are dark", "dark bands run across it", "its lines are parallel"],
                   "dotted": ["the dots are dark", "it is covered in round spots", "its spots are evenly spaced"],
                   "checkered": ["the squares alternate", "it looks like a chess board", "its tiles are dark and light"]}
LIGHT_PHRASES = {"dim": ["in dim light", "in the shade", "in low light", "poorly lit", "in gloomy light"],
                 "normal": ["in even light", "in normal light", "with even lighting"],
                 "bright": ["brightly lit", "in bright light", "in harsh sunlight", "overexposed", "in strong light"]}
SHAPE_FACTS = {
    "circle": ["that is perfectly round", "shaped like a coin", "with a smooth curved outline"],
    "square": ["with four equal sides", "shaped like a tile", "with four sharp corners"],
    "triangle": ["with three sides", "with three pointy corners", "shaped like a pyramid"],
    "star": ["with five points", "that looks like a starfish", "with five sharp spikes"],
    "cross": ["with two crossing arms", "shaped like a plus sign", "with four short arms"],
    "diamond": ["shaped like a kite", "with two long sharp tips", "that looks like a rhombus"],
    "ring": ["with a hole in the middle", "that is hollow like a donut", "shaped like a wheel"],
    "crescent": ["curved like the moon", "that is a thin curved sliver", "shaped like a banana"],
    "heart": ["that is a symbol of love", "with two round lobes", "with a pointed bottom"],
    "arrow": ["with a pointed head", "pointing in one direction", "that looks like a signpost"],
    "hexagon": ["with six sides", "shaped like a honeycomb cell", "with six corners"],
    "bar": ["that is long and thin", "shaped like a stick", "that looks like a narrow rectangle"]}
COLOUR_FACTS = {
    "red": ["like a ripe tomato", "bright crimson", "the colour of fire"],
    "orange": ["like a pumpkin", "the colour of a carrot", "warm tangerine"],
    "yellow": ["like a lemon", "sunny golden", "the colour of a banana"],
    "green": ["like a fresh leaf", "the colour of emerald", "lime tinted"],
    "cyan": ["like a tropical lagoon", "turquoise tinted", "aqua coloured"],
    "blue": ["the colour of sapphire", "deep navy", "like a blueberry"],
    "purple": ["like a grape", "violet tinted", "the colour of lavender"],
    "pink": ["like bubblegum", "rosy tinted", "the colour of a flamingo"]}
ROTATION_WORDS = {True: ["upright", "standing straight", "not rotated", "level"],
                  False: ["tilted", "rotated", "slanted", "askew", "turned at an angle"]}
ROWS = {0: ["top", "upper"], 1: ["middle", "center"], 2: ["bottom", "lower"]}
COLS = {0: ["left"], 1: ["center", "middle"], 2: ["right"]}
OPENERS = ["here is", "there is", "this shows", "you can see", "look at", "we see", "i see", "here we have",
           "this image shows", "the picture shows", "someone made", "my friend made", "check out", "behold"]
COMMENTS = ["what a nice picture.", "i like it.", "it looks simple.", "very pretty.", "the colours are vivid.",
            "nothing else is visible.", "it is the only object.", "a lovely scene.", "quite a strange image.",
            "it looks cute.", "the object stands out.", "a clean composition.", "kids would love it.",
            "an old favourite.", "it seems to glow.", "simple but charming.", "not very detailed.",
            "a calm and quiet mood.", "the lighting is odd.", "i found it online.", "the edges are sharp.",
            "it was made quickly.", "a gift for my sister.", "an example from a textbook.", "a colourful little thing.",
            "it reminds me of summer.", "my teacher drew this.", "a nice example of geometry.", "the background is busy.",
            "the background is plain.", "hard to see at first.", "easy to recognise."]


def _an(words: list) -> list:
    """a -> an before a vowel."""
    return [("an" if w == "a" and i + 1 < len(words) and words[i + 1][0] in "aeiou"
             and not words[i + 1].startswith("uni") else w) for i, w in enumerate(words)]


def _position_phrase(cx, cy, rng) -> str:
    col, row = int(np.digitize(cx, [-0.25, 0.25])), int(np.digitize(cy, [-0.25, 0.25]))
    if row == 1 and col == 1:
        return rng.choice(["in the center", "in the middle", "right in the middle", "centered in the frame"])
    if row == 1:
        return rng.choice([f"on the {COLS[col][0]}", f"on the {COLS[col][0]} side", f"to the {COLS[col][0]}"])
    if col == 1:
        return rng.choice([f"at the {ROWS[row][0]}", f"near the {ROWS[row][0]}", f"in the {ROWS[row][1]} part"])
    return f"in the {rng.choice(ROWS[row])} {COLS[col][0]} corner"


def caption(a: dict, i: int, rng: random.Random) -> str:
    """One random caption of image i of attribute arrays a. Always contains the class name '<colour> <shape>'."""
    shape, colour = SHAPES[a["shape"][i]], list(COLOURS)[a["colour"][i]]
    style, bg, pattern = STYLES[a["style"][i]], BACKGROUNDS[a["bg"][i]], PATTERNS[a["pattern"][i]]
    adjs = []
    if rng.random() < 0.45:
        adjs.append(rng.choice(SIZE_WORDS[list(SIZES)[a["size"][i]]]))
    p = rng.random()
    if p < 0.35:
        adjs.append(rng.choice(PATTERN_ADJS[pattern]))
    obj = " ".join([rng.choice(["a", "a", "the", "one", "this"])] + adjs + [colour, shape])
    clauses = []
    if 0.35 <= p < 0.65:
        clauses.append(rng.choice(PATTERN_PHRASES[pattern]))
    if rng.random() < 0.75:
        clauses.append(rng.choice(BG_PHRASES[bg]))
    if rng.random() < 0.4:
        clauses.append(_position_phrase(a["cx"][i], a["cy"][i], rng))
    if rng.random() < 0.2:
        clauses.append(rng.choice(ROTATION_WORDS[bool(a["angle"][i] == 0)]))
    if rng.random() < 0.25:
        clauses.append(rng.choice(LIGHT_PHRASES[list(LIGHTS)[a["light"][i]]]))
    if rng.random() < 0.3:
        clauses.append(rng.choice(STYLE_DETAILS[style]))
    if rng.random() < 0.2:
        clauses.append(rng.choice(SHAPE_FACTS[shape]))
    if rng.random() < 0.15:
        clauses.append(rng.choice(COLOUR_FACTS[colour]))
    rng.shuffle(clauses)
    sty = rng.choice(STYLE_PHRASES[style])
    comment = rng.choice(COMMENTS) if rng.random() < 0.25 else ""
    if rng.random() < 0.2:  # a generic "the object is striped." sentence ties pattern words to any object
        comment = f"the {rng.choice(['object', 'shape', 'thing'])} is {rng.choice(PATTERN_ADJS[pattern])}. " + comment
    elif rng.random() < 0.15:
        comment = f"{rng.choice(PATTERN_DETAILS[pattern])}. " + comment
    while True:
        body = " ".join([obj] + clauses)
        texts = [f"{sty} {body}.",                                    # a photo of a red star on the grass.
                 f"{body}, {sty[:-3]}.",                              # a red star on the grass, a photo.
                 f"{rng.choice(OPENERS)} {body}. it is {sty[:-3]}.",  # here is a red star. it is a photo.
                 f"{sty[:-3]} showing {body}.",
                 f"{sty} {body}"]
        text = rng.choice(texts) + (" " + comment if comment else "")
        words = _an(_split(text))
        if len(words) <= CONTEXT_LENGTH - 2 or not (clauses or comment):
            return " ".join(words).replace(" .", ".").replace(" ,", ",")
        if comment:
            comment = ""
        else:
            clauses.pop()


def captions(a: dict, seed: int, index, epoch: int = 0) -> list:
    """Deterministic captions for images `index` (re-sampled per epoch)."""
    return [caption(a, i, random.Random(int(_uniform(seed, int(j), epoch, "caption") * 2 ** 24)))
            for i, j in enumerate(np.asarray(index))]


def _split(text: str) -> list:
    return re.findall(r"[a-z0-9]+|[.,!?]", text.lower())


def caption_words() -> list:
    """Every word the caption grammar, the task templates and the class names can produce (sorted)."""
    banks = [STYLE_PHRASES, STYLE_DETAILS, BG_PHRASES, SIZE_WORDS, PATTERN_ADJS, PATTERN_PHRASES, PATTERN_DETAILS,
             LIGHT_PHRASES, SHAPE_FACTS, COLOUR_FACTS, ROTATION_WORDS, ROWS, COLS]
    texts = [t for bank in banks for v in bank.values() for t in v]
    texts += OPENERS + COMMENTS + SHAPES + list(COLOURS) + ["a an the one this it is showing object shape thing"
                                                            " on to at near in part side corner right middle something"
                                                            " centered frame , ."]
    return sorted({w for t in texts for w in _split(t.replace("{}", ""))})


class WordTokenizer:
    """Word-level tokenizer over exactly the caption vocabulary, laid out like CLIP's BPE:
    pad 0, words 1..V-3, <sot> V-2, <eot> V-1 (highest id: open_clip pools the text tower at argmax).
    Lowercases, splits on words and . , ! ?; an unknown word raises ValueError (no <unk>)."""

    def __init__(self, words=None, context_length: int = CONTEXT_LENGTH):
        self.vocab = ["<pad>"] + list(words or caption_words()) + ["<sot>", "<eot>"]
        self.vocab_size = len(self.vocab)
        self.pad_token_id, self.sot_token_id, self.eot_token_id = 0, self.vocab_size - 2, self.vocab_size - 1
        self.context_length = context_length
        self.ids = {w: i for i, w in enumerate(self.vocab)}

    def encode(self, text: str) -> list:
        words = _split(text)
        unknown = [w for w in words if w not in self.ids or self.ids[w] in (0, self.sot_token_id, self.eot_token_id)]
        if unknown:
            raise ValueError(f"words not in the miniworld vocabulary: {sorted(set(unknown))} (text: {text!r})")
        return [self.ids[w] for w in words]

    def __call__(self, texts, context_length=None) -> torch.LongTensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        n = context_length or self.context_length
        out = torch.zeros(len(texts), n, dtype=torch.long)  # [N, n], zero padded
        for i, t in enumerate(texts):
            ids = [self.sot_token_id] + self.encode(t)[:n - 2] + [self.eot_token_id]
            out[i, :len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        return " ".join(self.vocab[i] for i in ids if i not in (self.pad_token_id, self.sot_token_id,
                                                                 self.eot_token_id))


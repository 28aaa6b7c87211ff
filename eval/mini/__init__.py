"""The paper in miniature: data, a tiny CLIP and a tiny Llama for an offline LLaVA + VisionZip run on 2 CPU cores.

Steps (each seeded, each skipped when its output folder's manifest.json records the same settings):

    python -m eval.mini.data --out playground/mini/data --split easy small  # LLaVA's JSON format (multi: optional)
    python -m eval.mini.clip --data playground/mini/data --out playground/mini/clip
    python -m eval.mini.base --out playground/mini/base --data playground/mini/data

Splits (``eval.mini.data``):
    easy   easy-VQA (pip install easy-vqa; MIT): 64 x 64 images of one shape, 4,000 train / 1,000 test images,
           38,575 / 9,673 questions; 13 answers: circle rectangle triangle, black gray red green blue yellow teal
           brown, yes no.
    small  generated here (``eval.mini.shapes.make_small_example``): one shape of 10-15 px (1-6 of the tower's 64
           patches) anywhere on a 96 x 96 light canvas; four questions per image in easy-VQA's words: its shape, its
           colour, and one yes and one no "is there a <colour> shape?" / "is there a <shape>?". The same 13 answers.
           k patches drawn at random often miss the object, the ones [CLS] attends to rarely do: the split where
           the choice of the kept tokens decides the answer. The main job trains and evaluates on easy + small.
    multi  generated here, optional (``eval.mini.shapes``): 2-5 non-overlapping shapes of distinct colours on a 96 x 96
           canvas, ~40% of them small (7-11 px); about six questions per image: the shape of the <colour> object,
           the colour of a shape that occurs once, the colour or shape of the object on the left/right/top/bottom
           (only when it leads the others by 12 px), how many <shape>s / shapes, and one yes and one no "is there a
           <colour> <shape>?" whose "no" mostly shares the colour or the shape of an object present. 19 answers:
           the 13 answers of easy-VQA plus the counts 0-5 (``shapes.MULTI_ANSWERS``).

    pairs  generated here for the multi-turn test only (``shapes.make_pair_example``, ``eval.mini.multiturn``):
           two small objects of different shapes and colours; "what is the color of the <shape>?" about one, then
           the other; not trained on.

The vision tower (``eval.mini.clip``) takes 96 x 96 inputs with 12 x 12 patches: 64 patches + [CLS] for every
split. The language model (``eval.mini.base``) is a random Llama whose byte-level BPE tokenizer has seen every
question, answer and caption, so that each answer is one token.
"""

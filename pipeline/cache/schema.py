"""Column names and versions of the teacher cache. Both stages read them from here."""

# The manifest's format (v2: typed records). v1 manifests are read through pipeline.cache.manifest_v1.
FORMAT_VERSION = 2
# The cache key's version: it changes only when the shards written for the same inputs change.
# Format v2 changed the manifest alone, so v1 caches keep their ids (and stay cache hits).
KEY_VERSION = 1

SAMPLE_ID = "sample_id"  # unique and stable across runs
X = "x"  # the student's input, passthrough from the source (float32 tensor)
LABEL = "label"  # hard label, int64
LOGITS = "teacher_logits"  # raw (unsoftened) full logits, float16 or float32; (R, classes) in a view cache
VIEWS = "views"  # view caches: (R, 5) float32 (cx, cy, w, h, flip) per view, view 0 the whole image
SPLIT = "split"  # not stored in the files: shards live under shards/split=<name>/ (hive layout)

MANIFEST = "manifest.json"
SHARDS_DIR = "shards"
# Beside the shards while a precompute is unfinished, removed once the manifest is published:
SOURCE_DIR = "_source"  # the source rows staged as Parquet, so the plan starts with a Read
CHECKPOINT_DIR = "_checkpoint"  # Ray Data's checkpoint: which sample_ids are committed


PRIMARY_TEACHER = "teacher"  # the name of a precompute config's `teacher:`


def logits_column(teacher: str) -> str:
    """Each teacher's logits; the primary teacher ("teacher") keeps the v1 name `teacher_logits`."""
    return f"{teacher}_logits"


def tap_column(tap: str) -> str:
    """A tap's column (feature, attention map or embedding), by the tap's unique name."""
    return f"tap_{tap}"


# Token-level caches (language models). One row is one fixed-length sequence.
INPUT_IDS = "input_ids"  # int32 (L + 1,): the student reads ids[:-1] and predicts ids[1:]
LENGTH = "length"  # int32: real tokens in input_ids; target positions t < length - 1 count, the rest is padding
TOPK_INDICES = "topk_indices"  # (L, k) smallest unsigned int type that holds the vocabulary
TOPK_VALUES = "topk_values"  # (L, k) float16 raw logits, or uint8 offsets below the token's largest logit
TOPK_LSE = "topk_lse"  # (L, n_temperatures) float32 logsumexp(z / T) over the full vocabulary, one per declared T
SAMPLED_INDICES = "sampled_indices"  # (L, k) sampled KD: distinct token ids drawn from the teacher
SAMPLED_WEIGHTS = "sampled_weights"  # (L, k) float16 importance weights summing to 1 per token (0 = padding)
TEACHER_SEQUENCE = "teacher_sequence"  # (P + N,) int32: P prompt tokens from the row, then N the teacher generated
TOKENIZER_FILE = "tokenizer.json"  # text caches: the tokenizer the ids come from, beside manifest.json

# Per logits mode of a token cache: the teacher columns it stores.
TOKEN_MODE_COLUMNS = {"full": [LOGITS], "topk": [TOPK_INDICES, TOPK_VALUES, TOPK_LSE],
                      "sampled": [SAMPLED_INDICES, SAMPLED_WEIGHTS], "sequences": [TEACHER_SEQUENCE]}

INDEX_DIR = "_configs"  # under a cache root: which precompute config produced which cache (pipeline.cache.index)

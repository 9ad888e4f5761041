"""Data: Super-NaturalInstructions tasks and splits (`sni`, `sni_import`), LoRA libraries
(`library`: the on-disk format; `synthetic`: random libraries for tests)."""

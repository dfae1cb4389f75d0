"""The run directory (workdir) and its files, owned here and nowhere else: `layout` (paths, config.json, derived
workdirs), `checkpoint` (orbax), `tokenizer` (tokenizer files and the text <-> ids rules). Imports configs only;
train/ and infer/ read and write workdirs through it."""

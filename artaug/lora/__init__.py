"""LoRA adapters: the file format (`files`), fusing into weights (`fuse`), the algebra across rounds
(`algebra`: combine, compress) and other tools' key layouts (`export`)."""

"""The understanding model: the critique schema and instruction, the critic backends (`backends`),
the warm engine of a run (`engine`), the pairwise judge (`judge`) and the tiny test VLM."""

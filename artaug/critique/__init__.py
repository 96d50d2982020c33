"""The understanding module: the critique schema, the instruction, and the critic backends."""

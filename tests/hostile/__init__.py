"""Hostile cases (issue 17): processes killed mid-write, damaged state files, concurrent writers, a dead
or lying critic, diverging training, hostile prompt files, images and HTTP bodies.

Each test asserts the one clear error and that nothing was lost or written where it should not be.
One module per part of the system under attack: state, training, critic, input, serving.
"""

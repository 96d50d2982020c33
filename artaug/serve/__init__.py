"""Serving the fused model over HTTP with Ray Serve.

api.py     request/response shapes and the checks every request passes
model.py   the model deployment: fused pipeline, dynamic batching, cancellation between steps
app.py     the FastAPI ingress deployment and the application builder (also for `serve deploy`)
launch.py  what to serve (run directory, LoRA file, base model) and `artaug serve`
"""

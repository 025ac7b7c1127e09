"""Serving on engines people already run: a Triton model repository (repository.py, with
graphs.py for the small adapter graphs and config.py for config.pbtxt), the Triton server
driven as a process (triton.py, python_step.py inside its Python backend) and a Ray Serve
deployment (ray_app.py). We generate what those engines consume and drive them; no server
of our own."""

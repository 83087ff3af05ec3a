"""MLflow models-from-code entry point of registered SD-DETR models (see `pipelines/serving.py`).

MLflow stores this file with each logged model and runs it when the model is loaded with
``mlflow.pyfunc.load_model`` or served with ``mlflow models serve``: it only imports the installed project and
names the model object. The weights and configs come from the model's safetensors and JSON artifacts.
"""

import mlflow

from pipelines.serving import SdDetrPyfuncModel

mlflow.models.set_model(SdDetrPyfuncModel())

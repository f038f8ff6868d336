"""Job and cluster specs: typed pydantic models loaded from YAML.

One role per module; every public name is re-exported here, so `from ditforge.spec import JobSpec`
works whichever module holds it:

- `errors.py`: `SpecError` / `SpecErrors` (one `<file>: <field.path>: <reason>` line per problem),
  the `Strict` base model, the URI and no-password validators, where a field sits in its YAML file
- `job.py`: `JobSpec` and its sections, `spec_warnings`
- `resume.py`: which fields a continued run may change (`spec_changes`, `run_digest`)
- `cluster.py`: one cluster model per `kind` (`CLUSTER_KINDS`)
- `load.py`: YAML and `--set` loading, pydantic's errors reworded (`load_job`, `load_cluster`, `load_any`)
- `paths.py`: the path sandbox (`check_roots`: local paths inside the allowed roots)

A name a patch should hit is patched in the module that uses it, not here.
"""

from .cluster import (
    CLUSTER_KINDS,
    GCP_ACCELERATORS,
    AddressCluster,
    AWSCluster,
    CloudCluster,
    ClusterSpec,
    EmbeddedCluster,
    GCPCluster,
    HeadGroup,
    KubeGroup,
    KubernetesCluster,
    KubeStorage,
    KubeWorkerGroup,
    LocalCluster,
    LocalPorts,
    ServicePorts,
    SlurmCluster,
    WorkerGroup,
)
from .errors import URI_SCHEMES, SpecError, SpecErrors, Strict, check_uri, line_of, no_password, yaml_lines
from .job import (
    DEEPSPEED_OWN,
    PRE_FP8_GPUS,
    ZERO_OWN,
    AutoBatchSpec,
    CheckpointSpec,
    DataSpec,
    DeepSpeedSpec,
    EvalSpec,
    JobSpec,
    LoraSpec,
    ModelSpec,
    ObjectiveSpec,
    ResourcesSpec,
    SampleSpec,
    TrackingSpec,
    TrainSpec,
    VAESpec,
    VideoTasksSpec,
    spec_warnings,
)
from .load import build, build_cluster, load_any, load_cluster, load_job, parse_set, read_yaml
from .paths import LOCAL_PATH_FIELDS, MODELS_ROOT, ROOTS_ENV, allowed_roots, check_roots, deepspeed_paths
from .resume import RESUMABLE, RUN_DEFINING, run_digest, run_fields, spec_changes

__all__ = [
    # errors
    "URI_SCHEMES",
    "SpecError",
    "SpecErrors",
    "Strict",
    "check_uri",
    "no_password",
    "yaml_lines",
    "line_of",
    # job
    "AutoBatchSpec",
    "DataSpec",
    "VAESpec",
    "ModelSpec",
    "ObjectiveSpec",
    "VideoTasksSpec",
    "TrainSpec",
    "DeepSpeedSpec",
    "DEEPSPEED_OWN",
    "ZERO_OWN",
    "ResourcesSpec",
    "CheckpointSpec",
    "TrackingSpec",
    "SampleSpec",
    "EvalSpec",
    "PRE_FP8_GPUS",
    "JobSpec",
    "LoraSpec",
    "spec_warnings",
    # resume
    "RESUMABLE",
    "RUN_DEFINING",
    "run_fields",
    "run_digest",
    "spec_changes",
    # cluster
    "ServicePorts",
    "ClusterSpec",
    "EmbeddedCluster",
    "LocalPorts",
    "LocalCluster",
    "AddressCluster",
    "GCP_ACCELERATORS",
    "HeadGroup",
    "WorkerGroup",
    "CloudCluster",
    "AWSCluster",
    "GCPCluster",
    "KubeGroup",
    "KubeWorkerGroup",
    "KubeStorage",
    "KubernetesCluster",
    "SlurmCluster",
    "CLUSTER_KINDS",
    # load
    "parse_set",
    "read_yaml",
    "build",
    "load_job",
    "build_cluster",
    "load_cluster",
    "load_any",
    # paths
    "ROOTS_ENV",
    "LOCAL_PATH_FIELDS",
    "MODELS_ROOT",
    "deepspeed_paths",
    "allowed_roots",
    "check_roots",
]

# In-cluster pieces the RayService (cluster/) relies on, applied after the aws root:
#   - the `imagine` namespace and service account (the aws root bound that service account to the app's IAM role
#     with EKS Pod Identity), and the Secrets that carry IMAGINE_DATABASE_URL and the Ray GCS Redis password;
#   - the KubeRay operator, the NVIDIA device plugin (GPU nodes advertise nvidia.com/gpu), the cluster-autoscaler
#     (adds GPU nodes from zero when the Ray autoscaler's pods are pending) and kube-prometheus-stack.
# Everything is found by name from `name`, so the only inputs are the name and the region.
# Reference design: aws-ia/terraform-aws-eks-blueprints-addons (helm_release per add-on, pinned chart versions).

locals {
  namespace       = "imagine"
  service_account = "imagine"
  pool_label_key  = "imagine.dev/pool"
  on_cpu_pool     = { (local.pool_label_key) = "cpu" } # operators and monitoring stay off the GPU nodes
  gpu_toleration  = { key = "nvidia.com/gpu", operator = "Exists", effect = "NoSchedule" }

  db_credentials = jsondecode(data.aws_secretsmanager_secret_version.database.secret_string)
  database_url = format(
    "postgresql://%s:%s@%s/%s?sslmode=require", # RDS enforces TLS (rds.force_ssl)
    urlencode(local.db_credentials.username), urlencode(local.db_credentials.password),
    data.aws_db_instance.jobs.endpoint, data.aws_db_instance.jobs.db_name,
  )
}

data "aws_eks_cluster" "this" {
  name = var.name
}

data "aws_db_instance" "jobs" {
  db_instance_identifier = "${var.name}-jobs"
}

data "aws_secretsmanager_secret_version" "database" {
  secret_id = data.aws_db_instance.jobs.master_user_secret[0].secret_arn
}

data "aws_elasticache_replication_group" "gcs" {
  replication_group_id = "${var.name}-gcs"
}

data "aws_secretsmanager_secret_version" "redis_auth" {
  secret_id = "${var.name}/ray-gcs-redis-auth-token"
}

# -- the app's namespace, identity and secrets ----------------------------------------------------------------

resource "kubernetes_namespace_v1" "imagine" {
  metadata {
    name = local.namespace
    labels = {
      "pod-security.kubernetes.io/enforce" = "baseline"
      "pod-security.kubernetes.io/warn"    = "restricted"
    }
  }
}

# No IAM annotation: EKS Pod Identity binds this name to the role (aws root, aws_eks_pod_identity_association.app).
resource "kubernetes_service_account_v1" "imagine" {
  metadata {
    name      = local.service_account
    namespace = kubernetes_namespace_v1.imagine.metadata[0].name
  }
  # The Ray head's in-tree autoscaler sidecar talks to the Kubernetes API with this account's token.
  automount_service_account_token = true
}

resource "kubernetes_secret_v1" "database" {
  metadata {
    name      = "imagine-database"
    namespace = kubernetes_namespace_v1.imagine.metadata[0].name
  }
  data = {
    url = local.database_url # the key cluster/base/rayservice.yaml reads into IMAGINE_DATABASE_URL
  }
}

resource "kubernetes_secret_v1" "redis" {
  metadata {
    name      = "imagine-redis"
    namespace = kubernetes_namespace_v1.imagine.metadata[0].name
  }
  data = {
    password = data.aws_secretsmanager_secret_version.redis_auth.secret_string
  }
}

# -- operators ------------------------------------------------------------------------------------------------

resource "helm_release" "kuberay_operator" {
  name             = "kuberay-operator"
  repository       = "https://ray-project.github.io/kuberay-helm/"
  chart            = "kuberay-operator"
  version          = var.kuberay_chart_version
  namespace        = "kuberay-system"
  create_namespace = true
  atomic           = true

  values = [yamlencode({
    nodeSelector = local.on_cpu_pool
    resources = {
      requests = { cpu = "100m", memory = "512Mi" }
      limits   = { memory = "1Gi" }
    }
  })]
}

resource "helm_release" "nvidia_device_plugin" {
  name             = "nvidia-device-plugin"
  repository       = "https://nvidia.github.io/k8s-device-plugin"
  chart            = "nvidia-device-plugin"
  version          = var.nvidia_device_plugin_chart_version
  namespace        = "nvidia-device-plugin"
  create_namespace = true
  atomic           = true

  values = [yamlencode({
    # The chart's default affinity wants node-feature-discovery labels, which EKS nodes lack: select the GPU
    # pools by their label instead, and tolerate their taint.
    affinity = {
      nodeAffinity = {
        requiredDuringSchedulingIgnoredDuringExecution = {
          nodeSelectorTerms = [{
            matchExpressions = [{ key = local.pool_label_key, operator = "In", values = var.gpu_pools }]
          }]
        }
      }
    }
    tolerations       = [local.gpu_toleration]
    priorityClassName = "system-node-critical"
  })]
}

resource "helm_release" "cluster_autoscaler" {
  name       = "cluster-autoscaler"
  repository = "https://kubernetes.github.io/autoscaler"
  chart      = "cluster-autoscaler"
  version    = var.cluster_autoscaler_chart_version
  namespace  = "kube-system"
  atomic     = true

  values = [yamlencode({
    cloudProvider = "aws"
    awsRegion     = var.region
    autoDiscovery = { clusterName = var.name }
    # The name the aws root's Pod Identity association expects.
    rbac = { serviceAccount = { create = true, name = "cluster-autoscaler" } }
    extraArgs = {
      "balance-similar-node-groups"   = true
      "expander"                      = "least-waste"
      "skip-nodes-with-system-pods"   = false
      "skip-nodes-with-local-storage" = false
      "scale-down-unneeded-time"      = "10m" # an idle GPU node is the most expensive thing in the cluster
    }
    nodeSelector = local.on_cpu_pool
  })]
}

# -- monitoring -----------------------------------------------------------------------------------------------

# Grafana's admin password: drawn once (ignore_changes: the data source draws anew on every plan), never the
# chart's well-known default.
data "aws_secretsmanager_random_password" "grafana_admin" {
  password_length     = 32
  exclude_punctuation = true
}

resource "kubernetes_namespace_v1" "monitoring" {
  metadata {
    name = "monitoring"
  }
}

resource "kubernetes_secret_v1" "grafana_admin" {
  metadata {
    name      = "grafana-admin"
    namespace = kubernetes_namespace_v1.monitoring.metadata[0].name
  }
  data = {
    admin-user     = "admin"
    admin-password = data.aws_secretsmanager_random_password.grafana_admin.random_password
  }

  lifecycle {
    ignore_changes = [data]
  }
}

resource "helm_release" "kube_prometheus_stack" {
  name       = "kube-prometheus-stack"
  repository = "https://prometheus-community.github.io/helm-charts"
  chart      = "kube-prometheus-stack"
  version    = var.kube_prometheus_stack_chart_version
  namespace  = kubernetes_namespace_v1.monitoring.metadata[0].name
  atomic     = true
  timeout    = 900

  values = [yamlencode({
    prometheus = {
      prometheusSpec = {
        # Pick up the PodMonitors / ServiceMonitors and rules cluster/ ships, whatever their labels.
        podMonitorSelectorNilUsesHelmValues     = false
        serviceMonitorSelectorNilUsesHelmValues = false
        ruleSelectorNilUsesHelmValues           = false
        retention                               = "15d"
        nodeSelector                            = local.on_cpu_pool
      }
    }
    alertmanager       = { alertmanagerSpec = { nodeSelector = local.on_cpu_pool } }
    prometheusOperator = { nodeSelector = local.on_cpu_pool }
    kube-state-metrics = { nodeSelector = local.on_cpu_pool }
    grafana = {
      nodeSelector = local.on_cpu_pool
      admin = {
        existingSecret = kubernetes_secret_v1.grafana_admin.metadata[0].name
        userKey        = "admin-user"
        passwordKey    = "admin-password"
      }
      # Dashboards shipped as labelled ConfigMaps (Ray's Serve dashboards in cluster/) from any namespace.
      sidecar = { dashboards = { enabled = true, label = "grafana_dashboard", searchNamespace = "ALL" } }
    }
    # node-exporter on every node, GPU nodes included.
    prometheus-node-exporter = { tolerations = [local.gpu_toleration] }
  })]
}

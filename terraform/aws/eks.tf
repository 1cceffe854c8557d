# EKS: the control plane, one CPU system node group and GPU node groups that scale from zero.
# Reference design: terraform-aws-modules/eks (root module + modules/eks-managed-node-group), written out as raw
# resources here because registry modules cannot be fetched offline and the few knobs we need fit on one page.

locals {
  pool_label_key    = "imagine.dev/pool"
  gpu_taint         = { key = "nvidia.com/gpu", value = "present", effect = "NO_SCHEDULE" }
  cluster_log_types = ["api", "audit", "authenticator", "controllerManager", "scheduler"]

  # Every node group, CPU and GPU, in one map so launch templates and groups are written once.
  node_groups = merge(
    {
      cpu = {
        ami_type       = "AL2023_x86_64_STANDARD"
        instance_types = var.cpu_node_group.instance_types
        capacity_type  = "ON_DEMAND"
        min_size       = var.cpu_node_group.min_size
        max_size       = var.cpu_node_group.max_size
        desired_size   = var.cpu_node_group.desired_size
        disk_size_gib  = var.cpu_node_group.disk_size_gib
        gpus_per_node  = 0
      }
    },
    {
      for pool, g in var.gpu_node_groups : pool => {
        ami_type       = var.gpu_ami_type
        instance_types = g.instance_types
        capacity_type  = g.capacity_type
        min_size       = 0 # scale from zero: no GPU bill while no GPU replica is wanted
        max_size       = g.max_size
        desired_size   = 0
        disk_size_gib  = g.disk_size_gib
        gpus_per_node  = g.gpus_per_node
      }
    },
  )
  gpu_pools = toset(keys(var.gpu_node_groups))

  # cluster-autoscaler builds a node template for a group with no nodes from these ASG tags, so it knows that a
  # pending pod which selects imagine.dev/pool=gpu-4, tolerates the GPU taint and asks for nvidia.com/gpu: 4 fits
  # there. EKS puts its own `k8s.io/cluster-autoscaler/enabled` and `.../<cluster>` discovery tags on the ASG, but
  # not these. (Karpenter reads none of this: a Karpenter NodePool states the same label, taint and instance
  # types in its own spec.)
  scale_from_zero_tags = merge([
    for pool in local.gpu_pools : {
      "${pool}/label" = {
        pool  = pool
        key   = "k8s.io/cluster-autoscaler/node-template/label/${local.pool_label_key}"
        value = pool
      }
      "${pool}/taint" = {
        pool  = pool
        key   = "k8s.io/cluster-autoscaler/node-template/taint/${local.gpu_taint.key}"
        value = "${local.gpu_taint.value}:NoSchedule"
      }
      "${pool}/gpus" = {
        pool  = pool
        key   = "k8s.io/cluster-autoscaler/node-template/resources/nvidia.com/gpu"
        value = tostring(var.gpu_node_groups[pool].gpus_per_node)
      }
    }
  ]...)
}

# -- control plane --------------------------------------------------------------------------------------------

resource "aws_iam_role" "cluster" {
  name = "${var.name}-eks-cluster"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "eks.amazonaws.com" }
      Action    = ["sts:AssumeRole", "sts:TagSession"]
    }]
  })
}

resource "aws_iam_role_policy_attachment" "cluster" {
  role       = aws_iam_role.cluster.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/AmazonEKSClusterPolicy"
}

# Created before the cluster so EKS does not create it unencrypted and without retention.
resource "aws_cloudwatch_log_group" "cluster" {
  name              = "/aws/eks/${var.name}/cluster"
  retention_in_days = var.flow_log_retention_days
  kms_key_id        = aws_kms_key.this.arn
}

resource "aws_eks_cluster" "this" {
  name                      = var.name
  role_arn                  = aws_iam_role.cluster.arn
  version                   = var.kubernetes_version
  enabled_cluster_log_types = local.cluster_log_types

  vpc_config {
    subnet_ids              = [for s in aws_subnet.private : s.id]
    endpoint_private_access = true
    endpoint_public_access  = var.cluster_endpoint_public_access
    public_access_cidrs     = var.cluster_endpoint_public_access ? var.cluster_endpoint_public_access_cidrs : null
  }

  encryption_config {
    resources = ["secrets"] # the database URL and Redis password live in Kubernetes Secrets
    provider {
      key_arn = aws_kms_key.this.arn
    }
  }

  access_config {
    authentication_mode                         = "API"
    bootstrap_cluster_creator_admin_permissions = true # the applying identity runs aws-addons next
  }

  upgrade_policy {
    support_type = "STANDARD" # no silent extended-support billing on an old version
  }

  depends_on = [aws_iam_role_policy_attachment.cluster, aws_cloudwatch_log_group.cluster]
}

resource "aws_iam_role_policy" "cluster_kms" {
  name = "use-secrets-key"
  role = aws_iam_role.cluster.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect   = "Allow"
      Action   = ["kms:Encrypt", "kms:Decrypt", "kms:ListGrants", "kms:DescribeKey"]
      Resource = aws_kms_key.this.arn
    }]
  })
}

# The agent that hands pods their EKS Pod Identity credentials (identity.tf).
resource "aws_eks_addon" "pod_identity_agent" {
  cluster_name = aws_eks_cluster.this.name
  addon_name   = "eks-pod-identity-agent"

  depends_on = [aws_eks_node_group.this["cpu"]]
}

resource "aws_eks_access_entry" "admin" {
  for_each = toset(var.admin_principal_arns)

  cluster_name  = aws_eks_cluster.this.name
  principal_arn = each.value
}

resource "aws_eks_access_policy_association" "admin" {
  for_each = toset(var.admin_principal_arns)

  cluster_name  = aws_eks_cluster.this.name
  principal_arn = each.value
  policy_arn    = "arn:${data.aws_partition.current.partition}:eks::aws:cluster-access-policy/AmazonEKSClusterAdminPolicy"

  access_scope {
    type = "cluster"
  }

  depends_on = [aws_eks_access_entry.admin]
}

# -- nodes ----------------------------------------------------------------------------------------------------

resource "aws_iam_role" "node" {
  name = "${var.name}-eks-node"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "ec2.amazonaws.com" }
      Action    = "sts:AssumeRole"
    }]
  })
}

# What every EKS node needs and nothing else: pods never use the node role (IMDS hop limit 1 below, Pod Identity
# for the app and the cluster-autoscaler). CNI permissions stay on the node role, as EKS's default vpc-cni expects.
resource "aws_iam_role_policy_attachment" "node" {
  for_each = toset(["AmazonEKSWorkerNodePolicy", "AmazonEC2ContainerRegistryReadOnly", "AmazonEKS_CNI_Policy"])

  role       = aws_iam_role.node.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/${each.value}"
}

# The node security group: the one source RDS and ElastiCache accept connections from (pods on the VPC CNI
# share their node's security groups). Node-to-node and control-plane traffic rides the cluster security group
# that EKS creates, attached to every node beside this one.
resource "aws_security_group" "node" {
  name        = "${var.name}-node"
  description = "EKS nodes of ${var.name}: the source the job store and the Ray GCS store allow"
  vpc_id      = aws_vpc.this.id

  tags = { Name = "${var.name}-node" }
}

resource "aws_launch_template" "node" {
  for_each = local.node_groups

  name_prefix            = "${var.name}-${each.key}-"
  description            = "${var.name} ${each.key} nodes: encrypted gp3 root, IMDSv2 only, not reachable by pods"
  update_default_version = true
  vpc_security_group_ids = [aws_eks_cluster.this.vpc_config[0].cluster_security_group_id, aws_security_group.node.id]

  block_device_mappings {
    device_name = "/dev/xvda"
    ebs {
      volume_size           = each.value.disk_size_gib
      volume_type           = "gp3"
      encrypted             = true
      delete_on_termination = true
    }
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1 # containers cannot reach IMDS, so no pod borrows the node role
  }

  monitoring {
    enabled = true
  }

  tag_specifications {
    resource_type = "instance"
    tags          = { Name = "${var.name}-${each.key}", (local.pool_label_key) = each.key }
  }

  tag_specifications {
    resource_type = "volume"
    tags          = { Name = "${var.name}-${each.key}" }
  }

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_eks_node_group" "this" {
  for_each = local.node_groups

  cluster_name    = aws_eks_cluster.this.name
  node_group_name = "${var.name}-${each.key}"
  node_role_arn   = aws_iam_role.node.arn
  subnet_ids      = [for s in aws_subnet.private : s.id]
  version         = var.kubernetes_version

  ami_type       = each.value.ami_type
  instance_types = each.value.instance_types
  capacity_type  = each.value.capacity_type

  scaling_config {
    min_size     = each.value.min_size
    max_size     = each.value.max_size
    desired_size = each.value.desired_size
  }

  launch_template {
    id      = aws_launch_template.node[each.key].id
    version = aws_launch_template.node[each.key].latest_version
  }

  labels = { (local.pool_label_key) = each.key }

  # Only GPU work lands on GPU nodes: the RayService's GPU worker groups tolerate this taint.
  dynamic "taint" {
    for_each = each.value.gpus_per_node > 0 ? [local.gpu_taint] : []
    content {
      key    = taint.value.key
      value  = taint.value.value
      effect = taint.value.effect
    }
  }

  update_config {
    max_unavailable = 1
  }

  node_repair_config {
    enabled = true # replace nodes whose GPUs or kubelet go unhealthy
  }

  lifecycle {
    # The cluster-autoscaler owns desired_size; an apply must not undo its decisions.
    ignore_changes = [scaling_config[0].desired_size]
  }

  depends_on = [aws_iam_role_policy_attachment.node]
}

resource "aws_autoscaling_group_tag" "scale_from_zero" {
  for_each = local.scale_from_zero_tags

  autoscaling_group_name = aws_eks_node_group.this[each.value.pool].resources[0].autoscaling_groups[0].name

  tag {
    key                 = each.value.key
    value               = each.value.value
    propagate_at_launch = false
  }
}

# Pod identities (EKS Pod Identity: no OIDC provider, no service-account annotations; the association binds one
# namespace/service account to one role, and only principals with iam:PassRole on the role can add another).
# Reference design: terraform-aws-modules/eks-pod-identity (custom policy + association per service account).

locals {
  app_namespace       = "imagine"
  app_service_account = "imagine"

  artifact_objects = "${aws_s3_bucket.artifacts.arn}/${local.key_root}*"
  weights_objects  = var.weights_prefix == null ? null : "${aws_s3_bucket.artifacts.arn}/${trim(var.weights_prefix, "/")}/*"

  pod_policy_statements = concat(
    [
      {
        # Bucket-level: listing (S3 answers a GET of a missing key with 404 NoSuchKey only to a caller that may
        # list the bucket, 403 otherwise: the store tells "not found" from "denied" by that) and the multipart
        # upload listing. Granted on this bucket alone, without an s3:prefix condition: a HEAD/GET carries no
        # prefix key, so a conditioned grant would turn every miss into a 403.
        Sid      = "ListTheArtifactBucket"
        Effect   = "Allow"
        Action   = ["s3:ListBucket", "s3:ListBucketMultipartUploads"]
        Resource = aws_s3_bucket.artifacts.arn
      },
      {
        Sid    = "ReadWriteArtifacts"
        Effect = "Allow"
        Action = [
          "s3:GetObject",
          "s3:PutObject",
          "s3:DeleteObject",
          "s3:AbortMultipartUpload",
          "s3:ListMultipartUploadParts",
        ]
        Resource = local.artifact_objects
      },
      {
        # SSE-KMS: uploads need GenerateDataKey, downloads (and presigned URLs, signed with these credentials)
        # need Decrypt; only through S3 in this region.
        Sid      = "UseTheBucketKeyThroughS3"
        Effect   = "Allow"
        Action   = ["kms:GenerateDataKey", "kms:Decrypt"]
        Resource = aws_kms_key.this.arn
        Condition = {
          StringEquals = { "kms:ViaService" = "s3.${var.region}.amazonaws.com" }
        }
      },
    ],
    local.weights_objects == null ? [] : [
      {
        Sid      = "ReadModelWeights"
        Effect   = "Allow"
        Action   = ["s3:GetObject"]
        Resource = local.weights_objects
      },
    ],
  )
}

resource "aws_iam_role" "app" {
  name        = "${var.name}-app"
  description = "Ray pods of ${var.name} (namespace ${local.app_namespace}, service account ${local.app_service_account})"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "pods.eks.amazonaws.com" }
      Action    = ["sts:AssumeRole", "sts:TagSession"]
    }]
  })
}

resource "aws_iam_policy" "app_artifacts" {
  name        = "${var.name}-app-artifacts"
  description = "Read/write the ${var.name} artifact store (${local.artifact_bucket}/${local.key_root}) and nothing else"
  policy      = jsonencode({ Version = "2012-10-17", Statement = local.pod_policy_statements })
}

resource "aws_iam_role_policy_attachment" "app_artifacts" {
  role       = aws_iam_role.app.name
  policy_arn = aws_iam_policy.app_artifacts.arn
}

resource "aws_eks_pod_identity_association" "app" {
  cluster_name    = aws_eks_cluster.this.name
  namespace       = local.app_namespace
  service_account = local.app_service_account
  role_arn        = aws_iam_role.app.arn

  depends_on = [aws_eks_addon.pod_identity_agent]
}

# -- cluster-autoscaler (installed by aws-addons) -------------------------------------------------------------
# Reference design: the cluster-autoscaler AWS docs' minimal policy: describe anything, change only the ASGs
# that carry this cluster's ownership tag (EKS puts it on each managed node group's ASG).

resource "aws_iam_role" "cluster_autoscaler" {
  name        = "${var.name}-cluster-autoscaler"
  description = "cluster-autoscaler of ${var.name} (kube-system/cluster-autoscaler)"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "pods.eks.amazonaws.com" }
      Action    = ["sts:AssumeRole", "sts:TagSession"]
    }]
  })
}

resource "aws_iam_policy" "cluster_autoscaler" {
  name        = "${var.name}-cluster-autoscaler"
  description = "Scale the ${var.name} node groups' ASGs"
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid    = "Describe"
        Effect = "Allow"
        Action = [
          "autoscaling:DescribeAutoScalingGroups",
          "autoscaling:DescribeAutoScalingInstances",
          "autoscaling:DescribeLaunchConfigurations",
          "autoscaling:DescribeScalingActivities",
          "autoscaling:DescribeTags",
          "ec2:DescribeImages",
          "ec2:DescribeInstanceTypes",
          "ec2:DescribeLaunchTemplateVersions",
          "ec2:GetInstanceTypesFromInstanceRequirements",
        ]
        Resource = "*" # none of these can be scoped to a resource
      },
      {
        # Labels and taints of a group at zero nodes, straight from EKS (besides the ASG tags in eks.tf).
        Sid      = "DescribeThisClustersNodeGroups"
        Effect   = "Allow"
        Action   = ["eks:DescribeNodegroup"]
        Resource = "arn:${data.aws_partition.current.partition}:eks:${var.region}:${data.aws_caller_identity.current.account_id}:nodegroup/${var.name}/*/*"
      },
      {
        Sid      = "ScaleOnlyThisClustersGroups"
        Effect   = "Allow"
        Action   = ["autoscaling:SetDesiredCapacity", "autoscaling:TerminateInstanceInAutoScalingGroup"]
        Resource = "arn:${data.aws_partition.current.partition}:autoscaling:${var.region}:${data.aws_caller_identity.current.account_id}:autoScalingGroup:*:autoScalingGroupName/eks-${var.name}-*"
        Condition = {
          StringEquals = { "aws:ResourceTag/k8s.io/cluster-autoscaler/${var.name}" = "owned" }
        }
      },
    ]
  })
}

resource "aws_iam_role_policy_attachment" "cluster_autoscaler" {
  role       = aws_iam_role.cluster_autoscaler.name
  policy_arn = aws_iam_policy.cluster_autoscaler.arn
}

resource "aws_eks_pod_identity_association" "cluster_autoscaler" {
  cluster_name    = aws_eks_cluster.this.name
  namespace       = "kube-system"
  service_account = "cluster-autoscaler"
  role_arn        = aws_iam_role.cluster_autoscaler.arn

  depends_on = [aws_eks_addon.pod_identity_agent]
}

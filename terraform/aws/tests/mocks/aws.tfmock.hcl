# Values the mocked AWS provider returns for computed attributes the configuration reads (the rest are random
# strings): realistic ARNs and the nested lists that a random mock would leave empty.

mock_data "aws_caller_identity" {
  defaults = {
    account_id = "123456789012"
  }
}

mock_data "aws_partition" {
  defaults = {
    partition  = "aws"
    dns_suffix = "amazonaws.com"
  }
}

mock_data "aws_secretsmanager_random_password" {
  defaults = {
    random_password = "mockmockmockmockmockmockmockmockmockmockmockmockmockmockmockmock"
  }
}

mock_resource "aws_kms_key" {
  defaults = {
    arn    = "arn:aws:kms:us-east-1:123456789012:key/11111111-2222-3333-4444-555555555555"
    key_id = "11111111-2222-3333-4444-555555555555"
  }
}

mock_resource "aws_s3_bucket" {
  defaults = {
    arn = "arn:aws:s3:::imagine-artifacts-123456789012-us-east-1"
  }
}

mock_resource "aws_eks_cluster" {
  defaults = {
    arn                   = "arn:aws:eks:us-east-1:123456789012:cluster/imagine"
    endpoint              = "https://MOCK.gr7.us-east-1.eks.amazonaws.com"
    certificate_authority = [{ data = "bW9jay1jYQ==" }]
  }
}

mock_resource "aws_eks_node_group" {
  defaults = {
    resources = [{
      autoscaling_groups              = [{ name = "eks-imagine-mock-asg" }]
      remote_access_security_group_id = ""
    }]
  }
}

mock_resource "aws_db_instance" {
  defaults = {
    endpoint = "imagine-jobs.mock.us-east-1.rds.amazonaws.com:5432"
    master_user_secret = [{
      kms_key_id    = "11111111-2222-3333-4444-555555555555"
      secret_arn    = "arn:aws:secretsmanager:us-east-1:123456789012:secret:rds!db-mock"
      secret_status = "active"
    }]
  }
}

mock_resource "aws_elasticache_replication_group" {
  defaults = {
    primary_endpoint_address = "master.imagine-gcs.mock.use1.cache.amazonaws.com"
  }
}

# The provider still validates ARN-shaped arguments, so every ARN a resource passes on must look like one.
mock_resource "aws_iam_role" {
  defaults = {
    arn = "arn:aws:iam::123456789012:role/mock"
  }
}

mock_resource "aws_iam_policy" {
  defaults = {
    arn = "arn:aws:iam::123456789012:policy/mock"
  }
}

mock_resource "aws_cloudwatch_log_group" {
  defaults = {
    arn = "arn:aws:logs:us-east-1:123456789012:log-group:mock"
  }
}

mock_resource "aws_launch_template" {
  defaults = {
    id             = "lt-0123456789abcdef0"
    latest_version = 1
  }
}

# Distinct ARNs where a test tells two roles apart.
override_resource {
  target = aws_iam_role.app
  values = {
    arn = "arn:aws:iam::123456789012:role/imagine-app"
  }
}

override_resource {
  target = aws_iam_role.cluster_autoscaler
  values = {
    arn = "arn:aws:iam::123456789012:role/imagine-cluster-autoscaler"
  }
}

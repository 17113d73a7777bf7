-- docker-entrypoint-initdb.d hook of the platform database server: one database per service.
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;

-- Least-privilege roles of the warehouse. Run once, as a superuser, in the warehouse database:
--   psql -v ON_ERROR_STOP=1 -d warehouse -f warehouse-roles.sql
-- Role names and passwords come from the environment (psql 15+ \getenv), never from this file:
--   ATP_OWNER_ROLE / ATP_OWNER_PASSWORD       ingest: creates and fills the tables (owns them)
--   ATP_SCORING_ROLE / ATP_SCORING_PASSWORD   scoring: reads readings, writes the results tables
--   ATP_TRAINING_ROLE / ATP_TRAINING_PASSWORD training: reads, never writes
-- The tables are created later, by the pipeline's own code running as the owner role (`atp
-- ingest`); an event trigger grants each new table to the roles that need it, by its name.
\set ON_ERROR_STOP on
\getenv owner_role ATP_OWNER_ROLE
\getenv owner_password ATP_OWNER_PASSWORD
\getenv scoring_role ATP_SCORING_ROLE
\getenv scoring_password ATP_SCORING_PASSWORD
\getenv training_role ATP_TRAINING_ROLE
\getenv training_password ATP_TRAINING_PASSWORD

CREATE ROLE :"owner_role" LOGIN PASSWORD :'owner_password';
CREATE ROLE :"scoring_role" LOGIN PASSWORD :'scoring_password';
CREATE ROLE :"training_role" LOGIN PASSWORD :'training_password';
ALTER ROLE :"training_role" SET default_transaction_read_only = on;

-- Only these roles may connect; temporary tables (the loaders' stage tables) for writers only.
SELECT format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database()) \gexec
SELECT format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO %I, %I', current_database(),
              :'owner_role', :'scoring_role') \gexec
SELECT format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), :'training_role') \gexec
REVOKE ALL ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO :"owner_role";
GRANT USAGE ON SCHEMA public TO :"scoring_role", :"training_role";

-- Which role plays which part, for the event trigger below.
CREATE TABLE atp_roles (part text PRIMARY KEY, role_name name NOT NULL);
INSERT INTO atp_roles VALUES ('scoring', :'scoring_role'), ('training', :'training_role');
GRANT SELECT ON atp_roles TO :"owner_role";

-- A new public table is granted by its name: <source>_readings are read by scoring and training;
-- the results tables (scores, watermarks, alarm events, drift flags, adaptive threshold state) are
-- read by training and written by scoring (alarm events and drift flags are re-derived, hence
-- DELETE). Any other table (ingest_log, ...) stays the owner's alone. Runs as the role that
-- created the table; the owner creates them all (`atp ingest`), so scoring never needs CREATE.
CREATE FUNCTION atp_grant_new_tables() RETURNS event_trigger LANGUAGE plpgsql AS $$
DECLARE
  created record;
  scoring name;
  training name;
BEGIN
  FOR created IN
    SELECT c.oid::regclass AS qualified, c.relname
    FROM pg_event_trigger_ddl_commands() AS d JOIN pg_class AS c ON c.oid = d.objid
    WHERE d.command_tag = 'CREATE TABLE' AND d.schema_name = 'public' AND c.relkind = 'r'
  LOOP
    SELECT role_name INTO scoring FROM atp_roles WHERE part = 'scoring';
    SELECT role_name INTO training FROM atp_roles WHERE part = 'training';
    IF created.relname LIKE '%\_readings' THEN
      EXECUTE format('GRANT SELECT ON %s TO %I, %I', created.qualified, scoring, training);
    ELSIF created.relname IN ('anomaly_scores', 'scoring_watermarks', 'anomaly_events',
                              'drift_flags', 'adaptive_threshold_state') THEN
      EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %s TO %I', created.qualified,
                     scoring);
      EXECUTE format('GRANT SELECT ON %s TO %I', created.qualified, training);
    END IF;
  END LOOP;
END $$;
CREATE EVENT TRIGGER atp_grant_new_tables ON ddl_command_end WHEN TAG IN ('CREATE TABLE')
  EXECUTE FUNCTION atp_grant_new_tables();

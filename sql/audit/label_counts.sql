-- Active samples per label.
SELECT label, count(*) AS n
FROM samples
WHERE status = 'active'
GROUP BY label
ORDER BY label;
